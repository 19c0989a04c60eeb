"""The scheduler's shell and the store: restart recovery, attempt fencing, the lease,
replay of finished tasks to watchers, and late results (in-process services)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError, NotFoundError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler import state as s
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_env import SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, scheduler_pb2

FINISHED = scheduler_pb2.EVENT_TYPE_TASK_FINISHED
RUN_FINISHED = scheduler_pb2.EVENT_TYPE_RUN_FINISHED


async def _watch(scheduler: SchedulerServiceImpl, run_id: str) -> list[scheduler_pb2.TaskEvent]:
    request = scheduler_pb2.WatchEventsRequest(run_id=run_id)
    return [event async for event in scheduler.watch_events(request)]


def _system(path: Path) -> EmbeddedSystem:
    return EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=1.0)],
        ledger_path=path,
        env=SimulatedEnvironmentService(),
    )


async def test_a_restarted_scheduler_requeues_unfinished_tasks_and_replays_finished_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite"
    first = SchedulerServiceImpl(SqliteLedger(path), ServiceResolver())
    await first.start()
    try:  # no service registered: every task waits
        reply = await first.submit_tasks(
            scheduler_pb2.SubmitTasksRequest(run_id="r", tasks=generate_tasks(6))
        )
        ids = list(reply.task_ids)
        # as the store saw it when the scheduler died: one task done, one in flight
        ledger = first.ledger
        await ledger.mark_running(ids[1], 1, f"{ids[1]}#1")
        done = common_pb2.TaskResult(
            task_id=ids[0], state=common_pb2.TASK_STATE_SUCCEEDED, has_reward=True, attempts=1
        )
        assert await ledger.finish(ids[0], done, common_pb2.Trajectory(task_id=ids[0]))
    finally:
        await first.stop()

    system = _system(path)
    async with system:
        # The old attempt is fenced: it can no longer checkpoint (nor be finished: the
        # state machine only accepts the new attempt's outcome).
        assert not await system.scheduler.ledger.save_checkpoint(ids[1], f"{ids[1]}#1", b"x")
        events = await _watch(system.scheduler, "r")
        # a second scheduler on the same store is refused while this one runs
        other = SchedulerServiceImpl(SqliteLedger(path), ServiceResolver(), lease_wait_s=0.3)
        with pytest.raises(InvalidRequestError, match=r"another scheduler .* holds the scheduler"):
            await other.start()
    finished = [e for e in events if e.type == FINISHED]
    assert sorted(e.task_id for e in finished) == sorted(ids)  # each task once
    assert finished[0].task_id == ids[0] and finished[0].HasField("trajectory")  # replayed
    results = {e.task_id: e.result for e in finished}
    assert results[ids[1]].attempts == 2 and results[ids[1]].attempt_id == f"{ids[1]}#2"
    assert all(results[i].attempts == 1 for i in ids[2:])
    assert all(r.state == common_pb2.TASK_STATE_SUCCEEDED for r in results.values())
    assert events[-1].type == RUN_FINISHED
    retried = [e for e in events if e.type == scheduler_pb2.EVENT_TYPE_TASK_RETRYING]
    assert [e.task_id for e in retried] in ([], [ids[1]])  # published before we watched

    # After yet another restart, a watcher gets the finished run from the ledger alone.
    third = SchedulerServiceImpl(SqliteLedger(path), ServiceResolver())
    await third.start()
    try:
        replay = await _watch(third, "r")
        assert [e.task_id for e in replay if e.type == FINISHED] == ids
        assert replay[-1].type == RUN_FINISHED
        with pytest.raises(NotFoundError):
            await _watch(third, "no-such-run")
    finally:
        await third.stop()


async def test_a_late_result_is_discarded_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    system = _system(tmp_path / "ledger.sqlite")
    async with system:
        scheduler = system.scheduler
        await scheduler.submit_tasks(
            scheduler_pb2.SubmitTasksRequest(run_id="r", tasks=generate_tasks(2))
        )
        events = await _watch(scheduler, "r")
        first = next(e for e in events if e.type == FINISHED)
        caplog.set_level(logging.WARNING, logger="megaflow.scheduler.service")
        late = common_pb2.TaskResult(
            task_id=first.task_id, state=common_pb2.TASK_STATE_FAILED, has_reward=True
        )
        scheduler._feed(  # a presumed-dead worker's result, after the task finished
            s.AttemptCompleted("late", first.task_id, first.result.attempt_id, late,
                               common_pb2.Trajectory())
        )  # fmt: skip
        assert scheduler.counters()["late_results"] == 1
        status = await scheduler.status(scheduler_pb2.StatusRequest())
        assert status.counters["late_results"] == 1  # what `megaflow status` shows
        rows = await scheduler.ledger.run("r")
    (record,) = [r for r in caplog.records if "late result" in r.getMessage()]
    assert record.task_id == first.task_id  # type: ignore[attr-defined]
    assert record.late_attempt_id == first.result.attempt_id  # type: ignore[attr-defined]
    assert first.result.attempt_id in record.getMessage()
    # the ledger kept the first (and only) outcome
    row = next(r for r in rows if r.task_id == first.task_id)
    assert row.state == common_pb2.TASK_STATE_SUCCEEDED


async def test_a_stall_of_the_schedulers_own_loop_is_not_the_services_silence(
    tmp_path: Path,
) -> None:
    scheduler = SchedulerServiceImpl(
        SqliteLedger(tmp_path / "ledger.sqlite"), ServiceResolver(), heartbeat_interval_s=0.2
    )
    await scheduler.start()
    try:
        await scheduler.register_service(
            scheduler_pb2.RegisterServiceRequest(
                kind=s.KIND_AGENT, address="127.0.0.1:9", capacity=4
            )
        )
        time.sleep(1.0)  # the point: this event loop stalls for 5 intervals
        await asyncio.sleep(0.15)
        assert (s.KIND_AGENT, "127.0.0.1:9") in scheduler.state.services  # not dropped
        for _ in range(100):  # with the loop running, two silent intervals drop it
            if (s.KIND_AGENT, "127.0.0.1:9") not in scheduler.state.services:
                break
            await asyncio.sleep(0.05)
        assert (s.KIND_AGENT, "127.0.0.1:9") not in scheduler.state.services
        assert scheduler.counters()["services_lost"] == 1
    finally:
        await scheduler.stop()


class _GatedLeaseLedger:
    """Renewals wait on a gate the test opens; only what keep_lease calls."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        self.entered.set()
        return await self.gate

    async def lease_holder(self, name: str) -> str:
        return "nobody"


async def test_stopping_the_lease_keeper_as_a_renewal_completes_stops_it() -> None:
    # A cancellation landing just as a renewal completes used to be swallowed
    # (asyncio.wait_for on 3.11): the keeper slept on and Ctrl-C hung in stop().
    from megaflow.scheduler import recovery

    ledger = _GatedLeaseLedger()
    keeper = asyncio.create_task(
        recovery.keep_lease(ledger, "me", 0.04, lambda why: None)  # type: ignore[arg-type]
    )
    await asyncio.wait_for(ledger.entered.wait(), 5)
    ledger.gate.set_result(True)  # the renewal completes...
    keeper.cancel()  # ...in the same loop iteration as the stop
    done, _ = await asyncio.wait([keeper], timeout=2)
    assert keeper in done and keeper.cancelled()


async def test_a_ledger_write_waits_out_a_store_outage_and_a_bad_one_raises(
    tmp_path: Path,
) -> None:
    """A transition's write that finds the store unreachable (its server killed, then
    restarted) is retried until the store is back: were it dropped, its task would
    never finish (seen with redis-server killed mid-run)."""
    from megaflow.core.errors import ServiceUnavailableError

    scheduler = SchedulerServiceImpl(SqliteLedger(tmp_path / "l.sqlite"), ServiceResolver())
    calls: list[int] = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 4:
            raise ServiceUnavailableError("redis redis://127.0.0.1:1/0: pipeline: refused")

    await asyncio.wait_for(scheduler._durable("finish", flaky), 30)
    assert len(calls) == 4

    async def invalid() -> None:
        raise InvalidRequestError("not a store outage")

    with pytest.raises(InvalidRequestError):
        await scheduler._durable("finish", invalid)
