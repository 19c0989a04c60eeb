"""`megaflow.connect`: an async client of a deployment's scheduler.

    async with megaflow.connect("127.0.0.1:7070") as client:
        run = await client.submit(tasks)        # the run is accepted (and durable)
        print(run.run_id)                       # keep it to re-attach later
        async for result in run:                # each task's Result as it finishes
            ...

`client.watch(run_id)` re-attaches to a run, from any process, after the one that
submitted it died: the scheduler replays the finished tasks from its ledger, then
streams the rest. The event stream reconnects by itself when the scheduler restarts,
and every task is yielded once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from types import TracebackType
from typing import Any

from megaflow._results import Result
from megaflow._run import Results, ScaffoldArg
from megaflow._tasks import TaskLike, task_specs
from megaflow.core.errors import InvalidRequestError
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.v1 import common_pb2, scheduler_pb2


def connect(address: str, *, timeout_s: float = 30.0, reconnect_for_s: float = 300.0) -> Client:
    """A client of the scheduler at `address` ("host:port"); use as `async with`.

    `timeout_s`: deadline of each call (submitting, status); `reconnect_for_s`: how long a
    watch keeps reconnecting to a scheduler that is down before it raises
    `ServiceUnavailableError`."""
    return Client(address, timeout_s=timeout_s, reconnect_for_s=reconnect_for_s)


class Client:
    """An async client of one scheduler (see `connect`)."""

    def __init__(
        self, address: str, *, timeout_s: float = 30.0, reconnect_for_s: float = 300.0
    ) -> None:
        self.address = address
        self.reconnect_for_s = reconnect_for_s
        self._scheduler = SchedulerServiceClient(address, timeout_s=timeout_s)

    def submit(
        self,
        tasks: Iterable[TaskLike],
        *,
        scaffold: ScaffoldArg = None,
        concurrency: int = 0,
        run_id: str = "",
    ) -> Run:
        """A new run of `tasks` (`megaflow.Task`s, `TaskSpec`s or anything with
        `to_proto()`). `await` it to submit it and learn its `run_id`, or iterate it
        directly (`async for result in client.submit(tasks)`), which submits first.

        `scaffold`: given to every task that names none; `concurrency`: hard cap on
        the run's tasks in flight (0: none); `run_id`: "" = the scheduler names it."""
        if concurrency < 0:
            raise InvalidRequestError(f"concurrency must be >= 0, got {concurrency}")
        request = scheduler_pb2.SubmitTasksRequest(
            tasks=task_specs(list(tasks), scaffold), max_concurrency=concurrency, run_id=run_id
        )
        if not request.tasks:
            raise InvalidRequestError("no tasks to submit")
        return Run(self, request=request)

    def watch(self, run_id: str) -> Run:
        """The run `run_id`, submitted earlier (by any client): iterate it for every
        task's result, the finished ones first. `NotFoundError` if the scheduler does
        not know the run."""
        if not run_id:
            raise InvalidRequestError("watch needs a run id")
        return Run(self, run_id=run_id)

    async def status(self) -> scheduler_pb2.StatusResponse:
        """The scheduler's queues, services and counters."""
        return await self._scheduler.status(scheduler_pb2.StatusRequest())

    async def close(self) -> None:
        await self._scheduler.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Run:
    """One run on a deployment: awaitable (submits it, once) and async-iterable (the
    results of its tasks as they finish; re-iterating starts over from the replay)."""

    def __init__(
        self,
        client: Client,
        *,
        request: scheduler_pb2.SubmitTasksRequest | None = None,
        run_id: str = "",
    ) -> None:
        self._client = client
        self._request = request
        self.run_id = run_id
        """The scheduler's id of the run ("" until submitted)."""
        self.task_ids: list[str] = []
        """The ids of its tasks (known once this client submitted it)."""

    async def _submit(self) -> Run:
        if self._request is not None and not self.run_id:
            reply = await self._client._scheduler.submit_tasks(self._request)
            self.run_id, self.task_ids = reply.run_id, list(reply.task_ids)
        return self

    def __await__(self) -> Generator[Any, None, Run]:
        return self._submit().__await__()

    def __aiter__(self) -> AsyncGenerator[Result, None]:
        return self._results()

    async def _results(self) -> AsyncGenerator[Result, None]:
        await self._submit()
        events = self._client._scheduler.watch_events(
            scheduler_pb2.WatchEventsRequest(run_id=self.run_id),
            reconnect_for_s=self._client.reconnect_for_s,
        )
        try:
            async for event in events:
                if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                    yield _result(event)
        finally:  # closed early (aclose, break): end the stream now, not at GC
            await events.aclose()  # type: ignore[attr-defined]

    async def results(self) -> Results:
        """Every task's result, once the run has finished."""
        return Results([result async for result in self], run_id=self.run_id)


def _result(event: scheduler_pb2.TaskEvent) -> Result:
    trajectory: common_pb2.Trajectory | None = (
        event.trajectory if event.HasField("trajectory") else None
    )
    return Result.from_proto(event.result, trajectory)
