"""An agent service that hangs (SIGSTOP) mid-run is detected within two heartbeat
intervals; its attempts are failed as infrastructure failures at once (their RunTask
calls cancelled, not left to a deadline) and reassigned to the second agent service;
every task ends exactly once with its true reward."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.testing.processes import ServiceProcess, kill_group, start_run
from megaflow.testing.server import wait_for
from megaflow.testing.simulated_model import SimulatedPolicy
from megaflow.v1 import scheduler_pb2

_wait = functools.partial(wait_for, poll_s=0.05)

pytestmark = pytest.mark.integration

TASKS = 40
CONCURRENCY = 20
SUCCESS_RATE = 0.8
HEARTBEAT_S = 2.0  # the scheduler's default heartbeat interval


def _status(address: str) -> scheduler_pb2.StatusResponse:
    async def ask() -> scheduler_pb2.StatusResponse:
        client = SchedulerServiceClient(address, timeout_s=5.0)
        try:
            return await client.status(scheduler_pb2.StatusRequest())
        finally:
            await client.close()

    return asyncio.run(ask())


def _agents(address: str) -> dict[str, int]:
    """Registered agent services -> attempts in flight there."""
    return {
        svc.address: svc.in_flight
        for svc in _status(address).services
        if svc.kind == scheduler_pb2.SERVICE_KIND_AGENT
    }


@pytest.mark.timeout(240)
def test_a_hung_agent_is_lost_within_two_intervals_and_its_tasks_move(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs: dict[str, ServiceProcess] = {}
    run: subprocess.Popen[str] | None = None
    run_log = tmp_path / "run.log"
    stopped: int | None = None

    def detail() -> str:
        logs = "".join(f"\n--- {k}:\n{p.output()[-2000:]}" for k, p in procs.items())
        return f"run exit {run.poll() if run else None}: {run_log.read_text()[-2000:]}{logs}"

    try:
        procs["scheduler"] = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "ledger.sqlite")
        ).start()
        sched = procs["scheduler"].address
        procs["model"] = ServiceProcess(
            "model", "--scheduler", sched, "--success-rate", str(SUCCESS_RATE)
        ).start()
        procs["env"] = ServiceProcess(
            "env", "--scheduler", sched, "--sandbox-dir", str(tmp_path / "sandboxes"),
            "--capacity", "64",
        ).start()  # fmt: skip
        procs["agent1"] = ServiceProcess("agent", "--scheduler", sched).start()
        procs["agent2"] = ServiceProcess("agent", "--scheduler", sched).start()
        hung, other = procs["agent1"].address, procs["agent2"].address
        _wait("both agents to register", lambda: len(_agents(sched)) == 2, 30, detail)
        run = start_run(
            run_log,
            "--scheduler", sched,
            "--tasks", str(TASKS),
            "--concurrency", str(CONCURRENCY),
            "--success-rate", str(SUCCESS_RATE),
            "--out", str(out),
        )  # fmt: skip
        _wait("attempts running on both agents",
                  lambda: min(_agents(sched).values(), default=0) >= 3, 60, detail)  # fmt: skip
        on_hung = _agents(sched)[hung]
        stopped = procs["agent1"].pid
        os.kill(stopped, signal.SIGSTOP)  # it hangs: no heartbeat, no answer, no death
        stopped_at = time.monotonic()
        _wait("the hung agent to be dropped", lambda: hung not in _agents(sched), 30, detail)
        detected_s = time.monotonic() - stopped_at
        # its attempts were failed at once and went to the other agent
        _wait("attempts running on the other agent",
                  lambda: _agents(sched).get(other, 0) >= 1, 30, detail)  # fmt: skip
        assert run.wait(timeout=150) == 0, detail()
        finished_s = time.monotonic() - stopped_at
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)  # so that it can stop gracefully
        kill_group(run)
        for proc in reversed(list(procs.values())):
            proc.stop()

    log = procs["scheduler"].output()
    match = re.search(
        rf"service {re.escape(hung)} lost: no heartbeat for ([\d.]+) s .*"
        r"failing its (\d+) attempts in flight",
        log,
    )
    assert match, log[-3000:]
    silent_s, failed = float(match.group(1)), int(match.group(2))
    assert failed >= 1  # failed at once, not left to their RunTask deadline
    print(
        f"\nSIGSTOP of an agent with {on_hung} attempts in flight: dropped {detected_s:.2f} s "
        f"after the stop (last heartbeat {silent_s:.2f} s before; interval {HEARTBEAT_S} s); "
        f"run finished {finished_s:.1f} s after the stop"
    )
    assert silent_s >= 2 * HEARTBEAT_S  # never dropped before two intervals of silence

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ids = [r["task_id"] for r in records]
    assert len(ids) == len(set(ids)) == TASKS
    policy = SimulatedPolicy(success_rate=SUCCESS_RATE, seed=0)
    for r in records:
        assert r["status"] == "succeeded", r
        assert r["reward"] == (1.0 if policy.solves(r["task_id"]) else 0.0), r
    moved = [r for r in records if r["attempts"] >= 2]
    assert len(moved) >= failed, (failed, moved)  # every attempt on the hung agent went again
