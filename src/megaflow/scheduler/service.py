"""The scheduler's I/O shell around the pure `SchedulerState`.

It records every transition in the ledger before announcing it, runs each dispatched
attempt as an asyncio task calling an Agent Service (in-process or over gRPC), feeds
outcomes back as events, and publishes task events to watchers. Remote services
register and then re-register every `heartbeat_interval_s`; one silent for two
intervals is dropped from placement and the attempts running on it are failed (their
RunTask calls cancelled) and retried. The state machine gets the monotonic clock with
every event (queue waits, deadlines, rate limits) and asks for a `Wake` when a
rate-limited task will have its token.

The ledger is the source of truth (`megaflow.scheduler.recovery`): one scheduler per
store (a lease), a restarted scheduler re-queues the unfinished tasks it finds there,
and a watcher gets the finished tasks replayed from the ledger, then live events (no
event history is kept in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from megaflow.core import jitter
from megaflow.core.errors import (
    InvalidRequestError,
    MegaFlowError,
    NotFoundError,
    ServiceUnavailableError,
)
from megaflow.rpc.resolver import LOCAL, ServiceResolver
from megaflow.scheduler import recovery
from megaflow.scheduler import state as s
from megaflow.scheduler.snapshot import status_response
from megaflow.store.ledger import TERMINAL_STATES, TaskLedger
from megaflow.v1 import agent_pb2, common_pb2, scheduler_pb2

log = logging.getLogger(__name__)

_TERMINAL_EVENTS = (scheduler_pb2.EVENT_TYPE_RUN_FINISHED,)
MISSED_HEARTBEATS = 2  # a service silent for this many intervals is lost


class _RunFeed:
    """A run's progress and its live subscribers (its history is in the ledger)."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total = total
        self.done = done
        self.subscribers: set[asyncio.Queue[scheduler_pb2.TaskEvent]] = set()
        self.finished = False


class SchedulerServiceImpl:
    def __init__(
        self,
        ledger: TaskLedger,
        resolver: ServiceResolver,
        *,
        policy: s.SchedulerPolicy | None = None,
        heartbeat_interval_s: float = 2.0,
        recover: bool = True,
        lease_ttl_s: float = 10.0,
        lease_wait_s: float = 30.0,
    ) -> None:
        """`recover`: re-queue the unfinished tasks found in the ledger at start.
        `lease_ttl_s`: the scheduler lease's TTL (0: take no lease); a restart after a
        crash waits up to that long; `lease_wait_s`: how long to wait for it at most."""
        self.ledger = ledger
        self.resolver = resolver
        self.state = s.SchedulerState(policy)
        self.heartbeat_interval_s = heartbeat_interval_s
        self._feeds: dict[str, _RunFeed] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._last_seen: dict[str, float] = {}
        self._stimuli = itertools.count()
        self._watchdog: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}  # attempt id -> its RunTask call
        self._recover = recover
        self._lease_ttl_s = lease_ttl_s
        self._lease_wait_s = lease_wait_s
        self._holder = recovery.new_holder()
        self._lease: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.ledger.open()
        if self._lease_ttl_s > 0:
            try:
                await recovery.hold_lease(
                    self.ledger, self._holder, self._lease_ttl_s, self._lease_wait_s
                )
            except BaseException:
                await self.ledger.close()
                raise
            self._lease = asyncio.create_task(
                recovery.keep_lease(self.ledger, self._holder, self._lease_ttl_s, self._lost_lease),
                name="scheduler-lease",
            )
        if self._recover:
            await self._recover_from_ledger()
        self._watchdog = asyncio.create_task(
            self._expire_services(time.monotonic()), name="scheduler-watchdog"
        )

    async def _recover_from_ledger(self) -> None:
        for found in await recovery.recover(self.ledger):
            run = found.run
            self._feeds[run.run_id] = _RunFeed(run.total, run.total - len(found.tasks))
            for row in found.tasks:
                if row.attempt_id:
                    self._publish(
                        run.run_id,
                        scheduler_pb2.TaskEvent(
                            type=scheduler_pb2.EVENT_TYPE_TASK_RETRYING,
                            task_id=row.spec.task_id,
                            attempt=row.attempts,
                            detail=f"scheduler restarted: attempt {row.attempt_id} abandoned",
                        ),
                    )
            self._feed(
                s.TasksSubmitted(
                    self._stimulus("recovered"),
                    run.run_id,
                    tuple(row.spec for row in found.tasks),
                    run.max_concurrency,
                    tuple(row.attempts for row in found.tasks),
                )
            )

    def _lost_lease(self, why: str) -> None:
        log.critical("%s: this scheduler stops (another one now owns the store)", why)
        for task in list(self._attempts):
            task.cancel()
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self, grace_s: float = 0.0) -> None:
        if self._lease is not None:
            self._lease.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._attempts):
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        if self._watchdog is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._lease is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease
            with contextlib.suppress(MegaFlowError, OSError):
                await self.ledger.release_lease(recovery.LEASE, self._holder)
        await self.ledger.close()

    def register_local(
        self,
        kind: s.ServiceKind,
        capacity: int,
        *,
        address: str = LOCAL,
        resources: scheduler_pb2.HostResources | None = None,
    ) -> None:
        """Register an in-process service (the embedded mode), without heartbeats.

        `address` names it for placement (the resolver must map it to the local
        implementation, see `ServiceResolver.set_local`); `resources` is what it offers.
        """
        self._feed(s.ServiceJoined(self._stimulus("local"), kind, address, capacity, resources))

    # -- the contract ---------------------------------------------------------------------
    async def submit_tasks(
        self, request: scheduler_pb2.SubmitTasksRequest
    ) -> scheduler_pb2.SubmitTasksResponse:
        if not request.tasks:
            raise InvalidRequestError("SubmitTasksRequest.tasks is empty")
        run_id = request.run_id or f"run-{uuid.uuid4().hex[:12]}"
        if run_id in self._feeds:
            raise InvalidRequestError(f"run {run_id!r} already exists")
        tasks = []
        seen: set[str] = set()
        for i, spec in enumerate(request.tasks):
            task = common_pb2.TaskSpec()
            task.CopyFrom(spec)
            task.task_id = task.task_id or f"{run_id}-{i:06d}"
            if task.task_id in seen:
                raise InvalidRequestError(f"task id {task.task_id!r} appears twice")
            if not task.problem_statement:
                raise InvalidRequestError(f"task {task.task_id!r} has no problem_statement")
            if task.deadline_s < 0:
                raise InvalidRequestError(f"task {task.task_id!r} has a negative deadline_s")
            rejection = self.state.rejection(task)
            if rejection is not None:
                raise InvalidRequestError(f"task {task.task_id!r} {rejection}")
            seen.add(task.task_id)
            tasks.append(task)
        # durable before acknowledged
        await self.ledger.add_tasks(run_id, tasks, max_concurrency=request.max_concurrency)
        self._feeds[run_id] = _RunFeed(len(tasks))
        self._feed(
            s.TasksSubmitted(
                self._stimulus("submit"), run_id, tuple(tasks), request.max_concurrency
            )
        )
        return scheduler_pb2.SubmitTasksResponse(run_id=run_id, task_ids=[t.task_id for t in tasks])

    async def watch_events(
        self, request: scheduler_pb2.WatchEventsRequest
    ) -> AsyncIterator[scheduler_pb2.TaskEvent]:
        """Every finished task of the run, replayed from the ledger, then live events
        (each task's TASK_FINISHED once) until RUN_FINISHED."""
        run_id = request.run_id
        feed = self._feeds.get(run_id)
        queue: asyncio.Queue[scheduler_pb2.TaskEvent] = asyncio.Queue()
        finished = feed is None or feed.finished
        if feed is not None:
            feed.subscribers.add(queue)  # before reading the ledger: nothing falls between
        try:
            rows = await self.ledger.run(run_id)
            if feed is None and not rows:
                raise NotFoundError(f"no run {run_id!r}")
            sent: set[str] = set()
            for row in rows:
                if row.state in TERMINAL_STATES:
                    sent.add(row.task_id)
                    yield recovery.finished_event(run_id, row)
            if finished:
                if len(sent) < len(rows):
                    raise NotFoundError(f"run {run_id!r} is unfinished but not scheduled here")
                end = scheduler_pb2.TaskEvent(type=scheduler_pb2.EVENT_TYPE_RUN_FINISHED)
                end.run_id, end.time_unix_s = run_id, time.time()
                yield end
                return
            while True:
                event = await queue.get()
                if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                    if event.task_id in sent:
                        continue  # replayed from the ledger already
                    sent.add(event.task_id)
                yield event
                if event.type in _TERMINAL_EVENTS:
                    return
        finally:
            if feed is not None:
                feed.subscribers.discard(queue)

    async def register_service(
        self, request: scheduler_pb2.RegisterServiceRequest
    ) -> scheduler_pb2.RegisterServiceResponse:
        if request.kind not in (s.KIND_MODEL, s.KIND_AGENT, s.KIND_ENV):
            raise InvalidRequestError(f"unknown service kind {request.kind}")
        if not request.address or ":" not in request.address:
            raise InvalidRequestError(f"service address {request.address!r} is not host:port")
        if request.capacity == 0:
            raise InvalidRequestError("service capacity must be > 0")
        self._last_seen[request.address] = time.monotonic()
        self._feed(
            s.ServiceJoined(
                self._stimulus("register"),
                request.kind,
                request.address,
                request.capacity,
                request.resources if request.HasField("resources") else None,
                heartbeats=True,
            )
        )
        return scheduler_pb2.RegisterServiceResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    def counters(self) -> dict[str, int]:
        """Failure-handling counters (shown by `megaflow status`)."""
        st = self.state
        return {
            "late_results": st.late_results,
            "services_lost": st.services_lost,
            "quarantined": st.quarantined,
        }

    async def status(self, request: scheduler_pb2.StatusRequest) -> scheduler_pb2.StatusResponse:
        now = time.monotonic()
        self.state.now = max(self.state.now, now)  # waits measured up to this moment
        return status_response(self.state, self._last_seen, now, self.counters())

    # -- the shell ------------------------------------------------------------------------
    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimuli)}"

    def _feed(self, event: s.Event) -> None:
        for instruction in self.state.handle(event, time.monotonic()):
            self._execute(instruction)

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)
        return task

    def _execute(self, instruction: s.Instruction) -> None:
        match instruction:
            case s.Dispatch():
                attempt_id = instruction.attempt_id
                call = self._spawn(self._attempt(instruction), f"attempt-{attempt_id}")
                self._running[attempt_id] = call
                call.add_done_callback(self._untrack)
            case s.ScheduleRetry():
                self._spawn(self._retry(instruction), f"retry-{instruction.task_id}")
            case s.Finish():
                self._spawn(self._finish(instruction), f"finish-{instruction.task_id}")
            case s.RunFinished():
                pass  # announced by _finish once the last result is durable
            case s.WakeAt():
                self._spawn(self._wake(instruction.delay_s), "scheduler-wake")
            case s.CancelAttempt():  # its worker is lost: the caller going away stops it
                pending = self._running.pop(instruction.attempt_id, None)
                if pending is not None:
                    pending.cancel()
            case s.LateResult():
                log.warning(
                    "discarded the late %s of attempt %s of task %s (current attempt: %s)",
                    instruction.what,
                    instruction.attempt_id,
                    instruction.task_id,
                    instruction.current_attempt_id or "none, the task is not running",
                    extra={
                        "task_id": instruction.task_id,
                        "late_attempt_id": instruction.attempt_id,
                        "current_attempt_id": instruction.current_attempt_id,
                        "late_results": self.state.late_results,
                    },
                )

    async def _attempt(self, d: s.Dispatch) -> None:
        spec = self.state.tasks[d.task_id].spec
        await self._durable(
            "mark_running", lambda: self.ledger.mark_running(d.task_id, d.attempt, d.attempt_id)
        )
        self._publish(
            d.run_id,
            scheduler_pb2.TaskEvent(
                type=scheduler_pb2.EVENT_TYPE_TASK_STARTED, task_id=d.task_id, attempt=d.attempt
            ),
        )
        request = agent_pb2.RunTaskRequest(
            task=spec, attempt_id=d.attempt_id, env_address=d.env, model_address=d.model
        )
        if d.attempt > 1:  # an earlier attempt may have left a checkpoint: resume from it
            try:
                checkpoint = await self.ledger.load_checkpoint(d.task_id)
                if checkpoint is not None:
                    request.resume.ParseFromString(checkpoint.data)
                    log.info("attempt %s resumes %s", d.attempt_id, checkpoint.attempt_id)
                    stimulus = self._stimulus("resumed")
                    self._feed(s.AttemptResumed(stimulus, d.task_id, d.attempt_id, checkpoint.seq))
            except Exception as error:  # no checkpoint is only slower: start over
                log.warning("checkpoint of %s not loaded (%s): starting over", d.task_id, error)
                request.ClearField("resume")
        try:
            agent = self.resolver.agent(d.agent)
            response = await agent.run_task(request)
        except MegaFlowError as error:
            log.info("attempt %s failed: %s", d.attempt_id, error)
            event: s.Event = s.AttemptFailed(
                self._stimulus("failed"),
                d.task_id,
                d.attempt_id,
                f"{type(error).__name__}: {error}",
                error.retryable,
                error.kind,
                error_type=type(error).__name__,
                unreachable=(error.address,)
                if isinstance(error, ServiceUnavailableError) and error.address
                else (),
            )
        except Exception as error:  # a bug below us is the platform's fault: retry
            log.exception("attempt %s crashed", d.attempt_id)
            event = s.AttemptFailed(
                self._stimulus("crashed"),
                d.task_id,
                d.attempt_id,
                f"{type(error).__name__}: {error}",
                True,
                common_pb2.ERROR_KIND_INFRA,
            )
        else:
            event = s.AttemptCompleted(
                self._stimulus("completed"),
                d.task_id,
                d.attempt_id,
                response.result,
                response.trajectory,
            )
        self._feed(event)

    def _untrack(self, call: asyncio.Task[None]) -> None:
        attempt_id = call.get_name().removeprefix("attempt-")
        if self._running.get(attempt_id) is call:
            del self._running[attempt_id]

    async def _retry(self, r: s.ScheduleRetry) -> None:
        await self._durable(
            "mark_retrying", lambda: self.ledger.mark_retrying(r.task_id, r.attempt, r.message)
        )
        self._publish(
            r.run_id,
            scheduler_pb2.TaskEvent(
                type=scheduler_pb2.EVENT_TYPE_TASK_RETRYING,
                task_id=r.task_id,
                attempt=r.attempt,
                detail=r.message,
            ),
        )
        await asyncio.sleep(jitter.spread(r.delay_s, 0.5))  # retries of one outage spread out
        self._feed(s.RetryDue(self._stimulus("retry"), r.task_id))

    async def _durable(self, what: str, write: Callable[[], Awaitable[object]]) -> None:
        """`write` to the ledger, again and again (jittered backoff, at most 2 s apart)
        while the store is unreachable (its server killed or restarting): a transition
        the state machine has made must reach the ledger, or its task is never finished.
        The ledger's writes are idempotent (a repeated `finish` or `mark_*` of the same
        attempt changes nothing)."""
        backoff = jitter.Backoff(0.05, 2.0, floor=0.01)
        while True:
            try:
                await write()
                return
            except MegaFlowError as error:
                if not error.retryable:
                    raise
                if not backoff.retries:
                    log.warning("ledger %s failed (%s); retrying until the store is back",
                                what, error)  # fmt: skip
                await asyncio.sleep(backoff.next())

    async def _wake(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._feed(s.Wake(self._stimulus("wake")))

    async def _finish(self, f: s.Finish) -> None:
        await self._durable("finish", lambda: self.ledger.finish(f.task_id, f.result, f.trajectory))
        event = scheduler_pb2.TaskEvent(
            type=scheduler_pb2.EVENT_TYPE_TASK_FINISHED,
            task_id=f.task_id,
            attempt=f.result.attempts,
            result=f.result,
        )
        if f.trajectory is not None:
            event.trajectory.CopyFrom(f.trajectory)
        self._publish(f.run_id, event)
        feed = self._feeds[f.run_id]
        feed.done += 1
        if feed.done == feed.total:  # every result is durable: the run is over
            self._publish(
                f.run_id, scheduler_pb2.TaskEvent(type=scheduler_pb2.EVENT_TYPE_RUN_FINISHED)
            )
            feed.finished = True

    def _publish(self, run_id: str, event: scheduler_pb2.TaskEvent) -> None:
        event.run_id = run_id
        event.time_unix_s = time.time()
        feed = self._feeds[run_id]
        for queue in feed.subscribers:
            queue.put_nowait(event)

    async def _expire_services(self, tick: float) -> None:
        """Drop a service silent for `MISSED_HEARTBEATS` intervals (checked 4x an
        interval, so it is lost within 2.25 intervals of its last heartbeat). A stall
        of this process's own event loop is not counted as the services' silence: their
        heartbeats may be waiting, unread, in our sockets."""
        limit = MISSED_HEARTBEATS * self.heartbeat_interval_s
        period = self.heartbeat_interval_s / 4
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stall, tick = now - tick - period, now
            if stall > period:
                log.warning("the scheduler's event loop stalled for %.2f s", stall)
                for address, seen in self._last_seen.items():
                    self._last_seen[address] = min(seen + stall, now)
            for address, seen in list(self._last_seen.items()):
                if seen < now - limit:
                    del self._last_seen[address]
                    running = sum(
                        1
                        for t in self.state.tasks.values()
                        if any(
                            svc.address == address and svc.kind != s.KIND_MODEL
                            for svc in t.placement
                        )
                    )
                    log.warning(
                        "service %s lost: no heartbeat for %.2f s (%d intervals); "
                        "failing its %d attempts in flight",
                        address,
                        now - seen,
                        MISSED_HEARTBEATS,
                        running,
                        extra={"address": address, "silent_s": now - seen},
                    )
                    reason = f"no heartbeat for {now - seen:.1f} s"
                    self._feed(s.ServiceLost(self._stimulus("lost"), address, reason))
