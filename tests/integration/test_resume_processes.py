"""A worker dies mid-task; the task resumes on another worker from its checkpoint.

Five processes over gRPC (scheduler, model, env, two agents with `--store`, the
scheduler's SQLite ledger). Once the task has a checkpoint, the agent process running it
is killed with SIGKILL; the scheduler retries the task on the other agent, which loads
the checkpoint, replays it into a fresh sandbox and finishes: one trajectory, the
resumption marked, the reward the deterministic policy earns undisturbed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.processes import ServiceProcess
from megaflow.testing.simulated_model import SimulatedPolicy
from megaflow.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.integration


def _checkpoint(ledger: Path, task_id: str) -> tuple[str, int] | None:
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5.0)
    try:
        row = db.execute(
            "SELECT attempt_id, seq FROM checkpoints WHERE task_id=?", (task_id,)
        ).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    finally:
        db.close()
    return None if row is None else (str(row[0]), int(row[1]))


async def test_a_task_resumes_on_another_agent_after_its_worker_is_killed(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.sqlite"
    procs: dict[str, ServiceProcess] = {}
    client: SchedulerServiceClient | None = None
    try:
        procs["scheduler"] = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(ledger)
        ).start()
        sched = procs["scheduler"].address
        procs["model"] = ServiceProcess(
            "model", "--scheduler", sched, "--time-scale", "3", "--success-rate", "0.8"
        ).start()
        procs["env"] = ServiceProcess(
            "env", "--scheduler", sched, "--sandbox-dir", str(tmp_path / "sandboxes")
        ).start()
        for name in ("agent-a", "agent-b"):
            procs[name] = ServiceProcess(
                "agent", "--scheduler", sched, "--store", str(ledger)
            ).start()
        client = SchedulerServiceClient(sched, timeout_s=30.0)
        async with asyncio.timeout(60):  # every service registered
            while len((await client.status(scheduler_pb2.StatusRequest())).services) < 4:
                await asyncio.sleep(0.1)

        (task,) = generate_tasks(1, seed=0)
        reply = await client.submit_tasks(scheduler_pb2.SubmitTasksRequest(tasks=[task]))
        async with asyncio.timeout(60):
            while _checkpoint(ledger, task.task_id) is None:
                await asyncio.sleep(0.02)
        status = await client.status(scheduler_pb2.StatusRequest())
        (busy,) = [
            s.address
            for s in status.services
            if s.kind == scheduler_pb2.SERVICE_KIND_AGENT and s.in_flight
        ]
        victim = next(n for n in ("agent-a", "agent-b") if procs[n].address == busy)
        procs[victim].kill()  # the worker dies mid-task

        finished = None
        async with asyncio.timeout(120):
            request = scheduler_pb2.WatchEventsRequest(run_id=reply.run_id)
            async for event in client.watch_events(request):
                if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                    finished = event
    finally:
        if client is not None:
            await client.close()
        for proc in reversed(list(procs.values())):
            proc.stop()

    assert finished is not None
    result, trajectory = finished.result, finished.trajectory
    assert result.state == common_pb2.TASK_STATE_SUCCEEDED, result.error
    assert result.attempts >= 2
    solves = SimulatedPolicy(success_rate=0.8, seed=0).solves(task.task_id)
    assert result.reward == (1.0 if solves else 0.0)  # as undisturbed
    (resumption,) = trajectory.resumptions
    assert resumption.from_attempt_id == f"{task.task_id}#1"
    assert resumption.attempt_id == trajectory.attempt_id != resumption.from_attempt_id
    assert 1 <= resumption.at_turn < len(trajectory.turns)
    assert [t.index for t in trajectory.turns] == list(range(len(trajectory.turns)))
    assert trajectory.turns[-1].response.tool_calls[0].name == "submit"
