"""Task deadlines are absolute: counted from the task's first start, kept in the store,
and enforced when a restarted scheduler recovers the task (a real scheduler restart on
one SQLite ledger, with in-process services)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler.recovery import recover
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_env import SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, scheduler_pb2

FINISHED = scheduler_pb2.EVENT_TYPE_TASK_FINISHED


async def test_a_task_past_its_deadline_at_a_scheduler_restart_ends_as_timed_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite"
    tasks = generate_tasks(3)
    tasks[1].budgets.task_timeout_s = 0.3  # started, then the scheduler died past it
    tasks[2].budgets.task_timeout_s = 3600.0  # started, well within it
    first = SchedulerServiceImpl(SqliteLedger(path), ServiceResolver())
    await first.start()
    try:  # no service registered: every task waits
        reply = await first.submit_tasks(scheduler_pb2.SubmitTasksRequest(run_id="r", tasks=tasks))
        ids = list(reply.task_ids)
        await first.ledger.mark_running(ids[1], 1, f"{ids[1]}#1")
        await first.ledger.mark_running(ids[2], 1, f"{ids[2]}#1")
        # a second attempt does not restart the clock
        await first.ledger.mark_retrying(ids[1], 1, "worker lost")
        await first.ledger.mark_running(ids[1], 2, f"{ids[1]}#2")
    finally:
        await first.stop()
    await asyncio.sleep(0.4)  # the scheduler is down past ids[1]'s deadline

    system = EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=1.0)],
        ledger_path=path,
        env=SimulatedEnvironmentService(),
    )
    async with system:
        request = scheduler_pb2.WatchEventsRequest(run_id="r")
        events = [e async for e in system.scheduler.watch_events(request)]
    finished = {e.task_id: e.result for e in events if e.type == FINISHED}
    assert sorted(finished) == sorted(ids)
    late = finished[ids[1]]
    assert (late.state, late.error_kind, late.has_reward, late.reward) == (
        common_pb2.TASK_STATE_FAILED,
        common_pb2.ERROR_KIND_TASK,
        True,
        0.0,
    )
    assert "deadline" in late.error and late.attempts == 2
    assert finished[ids[0]].state == common_pb2.TASK_STATE_SUCCEEDED
    assert finished[ids[2]].state == common_pb2.TASK_STATE_SUCCEEDED
    assert finished[ids[2]].attempts == 2  # resumed after the restart, not expired


async def test_recovery_counts_the_deadline_from_the_first_start(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    await ledger.open()
    try:
        (task,) = generate_tasks(1)
        task.budgets.task_timeout_s = 100.0
        await ledger.add_tasks("r", [task])
        (pending,) = await ledger.unfinished()
        assert pending.started_at == 0.0
        assert len(await recover(ledger, now=1e12)) == 1  # never started: no clock yet
        await ledger.mark_running(task.task_id, 1, "a#1")
        (row,) = await ledger.unfinished()
        assert row.started_at > 0
        assert len(await recover(ledger, now=row.started_at + 99.0)) == 1
        await ledger.mark_running(task.task_id, 2, "a#2")
        assert (await ledger.unfinished())[0].started_at == row.started_at
        assert await recover(ledger, now=row.started_at + 100.0) == []
        (done,) = await ledger.run("r")
        assert (done.state, done.error_kind) == (
            common_pb2.TASK_STATE_FAILED,
            common_pb2.ERROR_KIND_TASK,
        )
    finally:
        await ledger.close()
