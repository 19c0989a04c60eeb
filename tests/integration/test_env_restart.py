"""kill -9 of an Environment Service with ~50 live sandboxes, then a restart on the same
address and sandbox folder: the new process reclaims every orphan (process, cgroup,
mount, folder) and the tasks that were using them are retried as infrastructure
failures and finish with their true rewards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from megaflow.testing.mounts import mounts_under
from megaflow.testing.processes import ServiceProcess, kill_group, pids_mentioning, start_run
from megaflow.testing.server import free_port, wait_for
from megaflow.testing.simulated_model import SimulatedPolicy
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration

TASKS = 60
CAPACITY = 50
SUCCESS_RATE = 0.8


def _sandboxes(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.is_dir() and (p / "owner.json").exists()}


def _cgroups_of(root: Path, names: set[str]) -> set[Path]:
    dirs: set[Path] = set()
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((root / name / "owner.json").read_text())
            dirs.update(Path(p) for p in record.get("cgroups", []))
    return dirs


def _running_tasks(ledger: Path) -> set[str]:
    """Tasks the scheduler's ledger has in flight right now."""
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT task_id FROM tasks WHERE state=?", (common_pb2.TASK_STATE_RUNNING,)
        ).fetchall()
    finally:
        db.close()
    return {row[0] for row in rows}


def _sandbox_pids(root: Path) -> set[int]:
    """Processes whose command line names the sandbox folder (bwrap and its children),
    not counting the env service itself."""
    return {pid for pid, cmd in pids_mentioning(str(root)).items() if "megaflow.cli" not in cmd}


def _env(sched: str, port: int, root: Path, log: Path) -> ServiceProcess:
    return ServiceProcess(
        "env",
        "--scheduler",
        sched,
        "--listen",
        f"127.0.0.1:{port}",
        "--sandbox-dir",
        str(root),
        "--capacity",
        str(CAPACITY),
        log_path=log,
    )


@pytest.mark.timeout(240)
def test_env_kill9_restart_reclaims_orphans_and_retries(tmp_path: Path) -> None:
    root = tmp_path / "sandboxes"
    out = tmp_path / "out"
    port = free_port()
    procs: dict[str, ServiceProcess] = {}
    run: subprocess.Popen[str] | None = None
    run_log = tmp_path / "run.log"
    try:
        procs["scheduler"] = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "ledger.sqlite")
        ).start()
        sched = procs["scheduler"].address
        procs["model"] = ServiceProcess(
            "model",
            "--scheduler",
            sched,
            "--time-scale",
            "1",
            "--success-rate",
            str(SUCCESS_RATE),
        ).start()
        env_log = tmp_path / "env1.log"
        procs["env"] = _env(sched, port, root, env_log).start()
        procs["agent"] = ServiceProcess("agent", "--scheduler", sched).start()

        run = start_run(
            run_log,
            *("--scheduler", sched, "--tasks", str(TASKS), "--concurrency", str(CAPACITY)),
            *("--success-rate", str(SUCCESS_RATE), "--out", str(out)),
        )
        wait_for(
            f"{CAPACITY} live sandboxes",
            lambda: len(_sandboxes(root)) >= CAPACITY - 2,
            timeout_s=60,
            detail=lambda: (
                f"{len(_sandboxes(root))} sandboxes; run exit {run.poll()}: "
                + run_log.read_text()[-1500:]
                + "".join(f"\n--- {k}:\n{p.output()[-1500:]}" for k, p in procs.items())
            ),
        )
        old = _sandboxes(root)
        old_cgroups = _cgroups_of(root, old)
        old_pids = _sandbox_pids(root)
        assert old_pids, "no sandbox process found before the crash"

        # A crash of the service process alone: its sandboxes are orphaned, not stopped.
        in_flight = _running_tasks(tmp_path / "ledger.sqlite")
        env_pids = [procs["env"].pid]
        os.kill(env_pids[0], signal.SIGKILL)
        procs["env"].proc.wait(10)  # type: ignore[union-attr]
        wait_for(
            "the orphaned sandbox processes to die with their parent",
            lambda: not any(Path(f"/proc/{p}").exists() for p in old_pids),
            timeout_s=10,
        )
        # ...but their folders (and cgroups) are left behind for the restart to reclaim.
        assert old <= {p.name for p in root.iterdir()}
        assert [c for c in old_cgroups if c.exists()] or not old_cgroups
        procs.pop("env").kill()  # reap it and close its pipe (its group is already gone)

        procs["env"] = _env(sched, port, root, tmp_path / "env2.log").start()
        env_pids.append(procs["env"].pid)
        assert procs["env"].address == f"127.0.0.1:{port}"
        assert "reclaimed" in procs["env"].output()

        # Every orphan is gone: folders, cgroups, mounts, processes.
        assert not (old & {p.name for p in root.iterdir()})
        assert not [c for c in old_cgroups if c.exists()]
        assert not [m for m in mounts_under(root) if any(name in m for name in old)]
        assert not [p for p in old_pids if Path(f"/proc/{p}").exists()]

        run.wait(timeout=150)
        output = run_log.read_text()
        assert run.returncode == 0, output
    finally:
        kill_group(run)
        for proc in reversed(list(procs.values())):
            proc.stop()

    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == TASKS
    policy = SimulatedPolicy(success_rate=SUCCESS_RATE, seed=0)
    for r in results:
        assert r["status"] == "succeeded", (r, output)
        assert r["reward"] == (1.0 if policy.solves(r["task_id"]) else 0.0), r
    retried = {r["task_id"] for r in results if r["attempts"] >= 2}
    # The tasks in flight at the kill went again. One whose submission was scored just
    # before the kill may still finish on its first attempt (a failed release does not
    # fail a scored task), so a couple are allowed to escape the crash.
    assert len(in_flight) >= CAPACITY - 10, in_flight
    assert len(in_flight - retried) <= 2, (in_flight - retried, retried)
    # ...as infrastructure retries (TaskEvent RETRYING), not as task failures
    match = re.search(r"infrastructure retries\D*(\d+)", output)
    assert match and int(match.group(1)) >= len(retried), output
    # nothing is left after the services stopped
    assert not _sandboxes(root)
    assert not _sandbox_pids(root)
    assert not mounts_under(root)
    cgroup_bases = {c.parent for c in old_cgroups}
    prefixes = tuple(f"sb-{pid}-" for pid in env_pids)
    assert not [d for b in cgroup_bases for d in b.iterdir() if any(p in d.name for p in prefixes)]
