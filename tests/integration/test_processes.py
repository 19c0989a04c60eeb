"""The same run through four separate processes (scheduler, model, agent, env) over gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.model.simulated import SimulatedPolicy
from megaflow.testing.processes import ServiceProcess

pytestmark = pytest.mark.integration


def _pids_of(pattern: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    sandboxes = tmp_path / "sandboxes"
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["scheduler"] = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "ledger.sqlite")
        ).start()
        sched = procs["scheduler"].address
        procs["model"] = ServiceProcess(
            "model", "--scheduler", sched, "--time-scale", "0.05", "--success-rate", "0.8"
        ).start()
        procs["env"] = ServiceProcess(
            "env", "--scheduler", sched, "--sandbox-dir", str(sandboxes), "--capacity", "8"
        ).start()
        procs["agent"] = ServiceProcess("agent", "--scheduler", sched).start()
        yield procs
    finally:
        for name in ("agent", "env", "model", "scheduler"):
            if name in procs:
                procs[name].stop()


def test_eight_tasks_through_four_processes(
    cluster: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    pids = {p.pid for p in cluster.values()}
    assert len(pids) == 4  # four separate processes
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaflow.cli.main",
            "run",
            "--scheduler",
            cluster["scheduler"].address,
            "--tasks",
            "8",
            "--concurrency",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 8
    policy = SimulatedPolicy(success_rate=0.8, seed=0)
    for r in results:
        assert r["status"] == "succeeded", r
        assert r["reward"] == (1.0 if policy.solves(r["task_id"]) else 0.0)
    trajectories = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert {t["task_id"] for t in trajectories} == {r["task_id"] for r in results}
    assert all(t["turns"] and t["messages"] for t in trajectories)
    # every service did its part in its own process
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaflow.cli.main",
            "status",
            "--scheduler",
            cluster["scheduler"].address,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0 and "env" in status.stderr and "agent" in status.stderr


def test_stopping_the_env_process_leaves_no_sandbox(
    cluster: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    env = cluster["env"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaflow.cli.main",
            "run",
            "--scheduler",
            cluster["scheduler"].address,
            "--tasks",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    env.stop()
    sandboxes = tmp_path / "sandboxes"
    assert not sandboxes.exists() or not any(sandboxes.iterdir())
    assert not [p for p in _pids_of("bwrap") if _is_child_of_dir(p, sandboxes)]


def _is_child_of_dir(pid: int, directory: Path) -> bool:
    try:
        return str(directory) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
