"""The scheduler's I/O shell around the pure `SchedulerState`.

It records every transition in the ledger before announcing it, runs each dispatched
attempt as an asyncio task calling an Agent Service (in-process or over gRPC), feeds
outcomes back as events, and publishes task events to watchers. Remote services
register and then re-register every `heartbeat_interval_s`; one silent for three
intervals is dropped from placement. The state machine gets the monotonic clock with
every event (queue waits, deadlines, rate limits) and asks for a `Wake` when a
rate-limited task will have its token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from megaflow.core.errors import InvalidRequestError, MegaFlowError, NotFoundError
from megaflow.rpc.resolver import LOCAL, ServiceResolver
from megaflow.scheduler import state as s
from megaflow.scheduler.snapshot import percentile
from megaflow.store.ledger import TaskLedger
from megaflow.v1 import agent_pb2, common_pb2, scheduler_pb2

log = logging.getLogger(__name__)

_TERMINAL_EVENTS = (scheduler_pb2.EVENT_TYPE_RUN_FINISHED,)


class _RunFeed:
    """A run's event history and its live subscribers."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.history: list[scheduler_pb2.TaskEvent] = []
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
    ) -> None:
        self.ledger = ledger
        self.resolver = resolver
        self.state = s.SchedulerState(policy)
        self.heartbeat_interval_s = heartbeat_interval_s
        self._feeds: dict[str, _RunFeed] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._last_seen: dict[str, float] = {}
        self._stimuli = itertools.count()
        self._watchdog: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.ledger.open()
        self._watchdog = asyncio.create_task(self._expire_services(), name="scheduler-watchdog")

    async def stop(self, grace_s: float = 0.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._attempts):
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        if self._watchdog is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
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
        feed = self._feeds.get(request.run_id)
        if feed is None:
            raise NotFoundError(f"no run {request.run_id!r}")
        queue: asyncio.Queue[scheduler_pb2.TaskEvent] = asyncio.Queue()
        history = list(feed.history)
        feed.subscribers.add(queue)
        try:
            for event in history:
                yield event
            if feed.finished:
                return
            while True:
                event = await queue.get()
                yield event
                if event.type in _TERMINAL_EVENTS:
                    return
        finally:
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
            )
        )
        return scheduler_pb2.RegisterServiceResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def status(self, request: scheduler_pb2.StatusRequest) -> scheduler_pb2.StatusResponse:
        counts = self.state.counts()
        now = time.monotonic()
        self.state.now = max(self.state.now, now)  # waits measured up to this moment
        snap = self.state.snapshot()
        return scheduler_pb2.StatusResponse(
            pending=counts.get(common_pb2.TASK_STATE_PENDING, 0),
            running=counts.get(common_pb2.TASK_STATE_RUNNING, 0),
            succeeded=counts.get(common_pb2.TASK_STATE_SUCCEEDED, 0),
            failed=counts.get(common_pb2.TASK_STATE_FAILED, 0),
            services=[
                scheduler_pb2.ServiceStatus(
                    kind=svc.kind,
                    address=svc.address or "in-process",
                    capacity=svc.capacity,
                    in_flight=svc.in_flight,
                    last_seen_s_ago=now - self._last_seen.get(svc.address, now),
                    dispatched=svc.dispatched,
                    resources=svc.offer.to_proto(),
                    cpu_millis_used=svc.cpu_millis_used,
                    memory_mib_used=svc.memory_mib_used,
                    gpus_used=svc.gpus_used,
                    warm_placements=svc.warm_placements,
                )
                for svc in self.state.services.values()
            ],
            queued=snap.queued,
            runs=[
                scheduler_pb2.QueueDepth(key=k, queued=q, in_flight=n)
                for k, (q, n) in snap.runs.items()
            ],
            users=[
                scheduler_pb2.QueueDepth(key=k, queued=q, in_flight=n)
                for k, (q, n) in sorted(snap.users.items())
            ],
            oldest_wait_s=snap.oldest_wait_s,
            wait_p50_s=percentile(snap.waits, 50),
            wait_p99_s=percentile(snap.waits, 99),
            wait_samples=len(snap.waits),
            pools=[
                scheduler_pb2.PoolStatus(name=k, in_flight=n, limit=limit)
                for k, (n, limit) in sorted(snap.pools.items())
            ],
        )

    # -- the shell ------------------------------------------------------------------------
    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimuli)}"

    def _feed(self, event: s.Event) -> None:
        for instruction in self.state.handle(event, time.monotonic()):
            self._execute(instruction)

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    def _execute(self, instruction: s.Instruction) -> None:
        match instruction:
            case s.Dispatch():
                self._spawn(self._attempt(instruction), f"attempt-{instruction.attempt_id}")
            case s.ScheduleRetry():
                self._spawn(self._retry(instruction), f"retry-{instruction.task_id}")
            case s.Finish():
                self._spawn(self._finish(instruction), f"finish-{instruction.task_id}")
            case s.RunFinished():
                pass  # announced by _finish once the last result is durable
            case s.WakeAt():
                self._spawn(self._wake(instruction.delay_s), "scheduler-wake")

    async def _attempt(self, d: s.Dispatch) -> None:
        spec = self.state.tasks[d.task_id].spec
        await self.ledger.mark_running(d.task_id, d.attempt, d.attempt_id)
        self._publish(
            d.run_id,
            scheduler_pb2.TaskEvent(
                type=scheduler_pb2.EVENT_TYPE_TASK_STARTED, task_id=d.task_id, attempt=d.attempt
            ),
        )
        try:
            agent = self.resolver.agent(d.agent)
            response = await agent.run_task(
                agent_pb2.RunTaskRequest(
                    task=spec, attempt_id=d.attempt_id, env_address=d.env, model_address=d.model
                )
            )
        except MegaFlowError as error:
            log.info("attempt %s failed: %s", d.attempt_id, error)
            event: s.Event = s.AttemptFailed(
                self._stimulus("failed"),
                d.task_id,
                d.attempt_id,
                f"{type(error).__name__}: {error}",
                error.retryable,
                error.kind,
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

    async def _retry(self, r: s.ScheduleRetry) -> None:
        await self.ledger.mark_retrying(r.task_id, r.attempt, r.message)
        self._publish(
            r.run_id,
            scheduler_pb2.TaskEvent(
                type=scheduler_pb2.EVENT_TYPE_TASK_RETRYING,
                task_id=r.task_id,
                attempt=r.attempt,
                detail=r.message,
            ),
        )
        await asyncio.sleep(r.delay_s)
        self._feed(s.RetryDue(self._stimulus("retry"), r.task_id))

    async def _wake(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._feed(s.Wake(self._stimulus("wake")))

    async def _finish(self, f: s.Finish) -> None:
        await self.ledger.finish(f.task_id, f.result, f.trajectory)
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
        feed.history.append(event)
        for queue in feed.subscribers:
            queue.put_nowait(event)

    async def _expire_services(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            cutoff = time.monotonic() - 3 * self.heartbeat_interval_s
            for address, seen in list(self._last_seen.items()):
                if seen < cutoff:
                    log.warning("service %s missed its heartbeats; dropping it", address)
                    del self._last_seen[address]
                    self._feed(s.ServiceLost(self._stimulus("lost"), address))
