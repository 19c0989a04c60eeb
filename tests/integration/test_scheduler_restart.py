"""kill -9 of the scheduler mid-run, then a restart on the same address and store.

Four service processes (scheduler, simulated model, agent, env with real local
sandboxes) and `megaflow run --scheduler`. The restarted scheduler waits for the dead
one's lease to expire, rebuilds its queue from the store (the tasks that were running
get a new attempt; the old attempts died with their RunTask calls), the services
re-register on their next heartbeat, the client's watch reconnects and gets the
finished tasks replayed, and the run completes: every task terminal exactly once,
written once, with the reward the deterministic simulated policy gives it (what an
undisturbed run with the same seed gets). Once with the sqlite store, once with redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.testing.processes import ServiceProcess, kill_group, live_sandboxes, start_run
from megaflow.testing.redis_server import RedisServer, redis_available
from megaflow.testing.server import free_port, wait_for
from megaflow.testing.simulated_model import SimulatedPolicy

pytestmark = pytest.mark.integration

TASKS = 48
CONCURRENCY = 16
SUCCESS_RATE = 0.8


def n_live(root: Path) -> int:
    return len(live_sandboxes(root))


def _lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def _store(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield str(tmp_path / "ledger.sqlite")
        return
    if (why := redis_available()) is not None:
        pytest.skip(why)
    with RedisServer(tmp_path) as server:
        yield server.url


@pytest.mark.timeout(300)
@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
def test_scheduler_kill9_restart_the_run_continues_exactly_once(
    tmp_path: Path, store_kind: str
) -> None:
    out = tmp_path / "out"
    address = f"127.0.0.1:{free_port()}"
    procs: dict[str, ServiceProcess] = {}
    run: subprocess.Popen[str] | None = None
    run_log = tmp_path / "run.log"

    def scheduler(store: str, n: int) -> ServiceProcess:
        return ServiceProcess(
            "scheduler", "--listen", address, "--store", store, log_path=tmp_path / f"sched{n}.log"
        )

    def detail() -> str:
        logs = "".join(f"\n--- {k}:\n{p.output()[-2000:]}" for k, p in procs.items())
        return f"run exit {run.poll() if run else None}: {run_log.read_text()[-2000:]}{logs}"

    with _store(store_kind, tmp_path) as store:
        try:
            procs["scheduler"] = scheduler(store, 1).start()
            procs["model"] = ServiceProcess(
                "model", "--scheduler", address, "--success-rate", str(SUCCESS_RATE)
            ).start()
            procs["env"] = ServiceProcess(
                "env", "--scheduler", address, "--sandbox-dir", str(tmp_path / "sandboxes"),
                "--capacity", "64",
            ).start()  # fmt: skip
            procs["agent"] = ServiceProcess("agent", "--scheduler", address).start()
            run = start_run(
                run_log,
                "--scheduler", address,
                "--tasks", str(TASKS),
                "--concurrency", str(CONCURRENCY),
                "--success-rate", str(SUCCESS_RATE),
                "--out", str(out),
            )  # fmt: skip
            results = out / "results.jsonl"
            sandboxes = tmp_path / "sandboxes"
            # crash with a quarter written and attempts holding sandboxes (on a loaded
            # machine a moment between waves can have few)
            wait_for("a quarter of the results, attempts in flight",
                      lambda: _lines(results) >= TASKS // 4 and n_live(sandboxes) >= 4, 120,
                      detail)  # fmt: skip
            written_before = _lines(results)
            os.kill(procs["scheduler"].pid, signal.SIGKILL)
            procs.pop("scheduler").kill()  # reap it
            killed_at = time.monotonic()
            assert written_before < TASKS, "the run finished before the crash"
            # The agent sees its caller gone: it stops the orphaned attempts, which
            # release their sandboxes (nothing can commit their results any more). One
            # whose CreateEnvironment was in flight releases by owner, which also undoes
            # that create (the agent never learnt its id): none is left to the env's
            # lease reaper.
            live = n_live(sandboxes)
            wait_for(f"the orphaned attempts to release their sandboxes (of {live})",
                      lambda: n_live(sandboxes) == 0, 60,
                      lambda: f"left: {live_sandboxes(sandboxes)}; {detail()}")  # fmt: skip

            procs["scheduler"] = scheduler(store, 2).start(timeout_s=60)
            restarted_s = time.monotonic() - killed_at
            log2 = procs["scheduler"].output
            wait_for("the restarted scheduler to recover", lambda: "recovered" in log2(), 30,
                      detail)  # fmt: skip
            assert run.wait(timeout=180) == 0, detail()
            print(
                f"\n[{store_kind}] kill -9 after {written_before}/{TASKS} results; "
                f"restarted (lease expired) in {restarted_s:.1f} s; "
                f"run finished {time.monotonic() - killed_at:.1f} s after the kill"
            )
        finally:
            kill_group(run)
            for proc in reversed(list(procs.values())):
                proc.stop()

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ids = [r["task_id"] for r in records]
    assert len(ids) == len(set(ids)) == TASKS, "a task written twice or missing"
    trajectories = (out / "trajectories.jsonl").read_text().splitlines()
    assert sorted(json.loads(t)["task_id"] for t in trajectories) == sorted(ids)
    policy = SimulatedPolicy(success_rate=SUCCESS_RATE, seed=0)
    for r in records:
        assert r["status"] == "succeeded", r
        assert r["reward"] == (1.0 if policy.solves(r["task_id"]) else 0.0), r
    # the recovered scheduler found the crashed one's unfinished tasks in the store
    sched2 = (tmp_path / "sched2.log").read_text()
    assert "recovered" in sched2 and "waiting up to" in sched2, sched2[-2000:]
    retried = [r for r in records if r["attempts"] >= 2]
    assert retried, "no task was in flight at the crash"
