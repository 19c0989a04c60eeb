"""The same run through four separate processes (scheduler, model, agent, env) over gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.testing.processes import ServiceProcess
from megaflow.testing.simulated_model import SimulatedPolicy
from megaflow.v1 import scheduler_pb2

pytestmark = pytest.mark.integration


def _pids_of(pattern: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def _start(tmp_path: Path, envs: int = 1, env_capacity: int = 8) -> dict[str, ServiceProcess]:
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["scheduler"] = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "ledger.sqlite")
        ).start()
        sched = procs["scheduler"].address
        procs["model"] = ServiceProcess(
            "model", "--scheduler", sched, "--time-scale", "0.05", "--success-rate", "0.8"
        ).start()
        for i in range(envs):
            procs["env" if i == 0 else f"env{i}"] = ServiceProcess(
                "env",
                "--scheduler",
                sched,
                "--sandbox-dir",
                str(tmp_path / "sandboxes"),
                "--capacity",
                str(env_capacity),
            ).start()
        procs["agent"] = ServiceProcess("agent", "--scheduler", sched).start()
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs: dict[str, ServiceProcess]) -> None:
    for proc in reversed(list(procs.values())):
        proc.stop()


def _run(
    scheduler: str, out: Path, tasks: int, concurrency: int
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "megaflow.cli",
            "run",
            "--scheduler",
            scheduler,
            "--tasks",
            str(tasks),
            "--concurrency",
            str(concurrency),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    procs = _start(tmp_path)
    yield procs
    _stop(procs)


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
            "megaflow.cli",
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
            "megaflow.cli",
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
            "megaflow.cli",
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


async def test_a_second_env_process_adds_capacity(tmp_path: Path) -> None:
    procs = _start(tmp_path, envs=2, env_capacity=2)
    try:
        run = _run(procs["scheduler"].address, tmp_path / "out", tasks=8, concurrency=8)
        assert run.returncode == 0, run.stderr
        client = SchedulerServiceClient(procs["scheduler"].address)
        status = await client.status(scheduler_pb2.StatusRequest())
        await client.close()
    finally:
        _stop(procs)
    envs = [s for s in status.services if s.kind == scheduler_pb2.SERVICE_KIND_ENV]
    assert len(envs) == 2
    assert all(e.dispatched > 0 for e in envs)  # both took work
    assert sum(e.dispatched for e in envs) == 8
    assert status.succeeded == 8
