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

import uuid
from collections.abc import AsyncGenerator, Generator, Iterable
from types import TracebackType
from typing import Any

from megaflow._results import Result
from megaflow._run import Results, ScaffoldArg
from megaflow._tasks import TaskLike, task_specs
from megaflow.core.errors import InvalidRequestError
from megaflow.rpc.auth import RpcSecurity
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.v1 import common_pb2, scheduler_pb2


def connect(
    address: str,
    *,
    timeout_s: float = 30.0,
    reconnect_for_s: float = 300.0,
    security: RpcSecurity | None = None,
) -> Client:
    """A client of the scheduler at `address` ("host:port"); use as `async with`.

    `timeout_s`: deadline of each call (submitting, status); `reconnect_for_s`: how long a
    watch keeps reconnecting to a scheduler that is down before it raises
    `ServiceUnavailableError`. `security`: the deployment's token and/or TLS files
    (`megaflow.rpc.auth.load(token_file=...)`); default: from the environment
    ($MEGAFLOW_AUTH_TOKEN, $MEGAFLOW_TLS_CERT...). Wrong ones: `AuthenticationError`."""
    return Client(address, timeout_s=timeout_s, reconnect_for_s=reconnect_for_s, security=security)


class Client:
    """An async client of one scheduler (see `connect`)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        reconnect_for_s: float = 300.0,
        security: RpcSecurity | None = None,
    ) -> None:
        self.address = address
        self.reconnect_for_s = reconnect_for_s
        self._scheduler = SchedulerServiceClient(address, timeout_s=timeout_s, security=security)

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

    def resume(
        self,
        run_id: str,
        tasks: Iterable[TaskLike],
        *,
        scaffold: ScaffoldArg = None,
        concurrency: int = 0,
    ) -> Run:
        """A rerun of run `run_id` (finished, or waited for): of `tasks` (the run's tasks,
        matched by `task_id`), only those without a scored result there run again, as a
        new run. Iterating it yields the earlier scored results first, then the new
        ones, all under the tasks' own ids.

        The scheduler knows each task id once, so the new run names its tasks
        `TASK_ID@NEW_RUN_ID`; this object maps them back (a `watch` of the new run id
        shows the new names)."""
        run = self.submit(tasks, scaffold=scaffold, concurrency=concurrency)
        run.resumes = run_id
        return run

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
        self.resumes = ""
        """The run this one resumes ("" = none: see `Client.resume`)."""
        self.kept: list[Result] = []
        """The scored results kept from the run it resumes."""
        self._aliases: dict[str, str] = {}  # resumed: the new run's task id -> the task's

    async def _submit(self) -> Run:
        if self._request is None or self.run_id:
            return self
        if self.resumes:
            await self._keep_scored()
        if self._request.tasks:
            reply = await self._client._scheduler.submit_tasks(self._request)
            self.run_id, self.task_ids = reply.run_id, list(reply.task_ids)
        else:  # everything was scored already: nothing to submit
            self.run_id = self.resumes
        return self

    async def _keep_scored(self) -> None:
        assert self._request is not None
        earlier = await self._client.watch(self.resumes).results()
        self.kept = [result for result in earlier if result.scored]
        scored = {result.task_id for result in self.kept}
        todo = [spec for spec in self._request.tasks if spec.task_id not in scored]
        if any(not spec.task_id for spec in todo):
            raise InvalidRequestError("resume matches tasks by task_id: every task needs one")
        self._request.run_id = f"run-{uuid.uuid4().hex[:12]}"
        del self._request.tasks[:]
        for spec in todo:
            renamed = f"{spec.task_id}@{self._request.run_id}"
            self._aliases[renamed] = spec.task_id
            spec.task_id = renamed
            self._request.tasks.append(spec)

    def __await__(self) -> Generator[Any, None, Run]:
        return self._submit().__await__()

    def __aiter__(self) -> AsyncGenerator[Result, None]:
        return self._results()

    async def _results(self) -> AsyncGenerator[Result, None]:
        await self._submit()
        for result in self.kept:
            yield result
        if self.run_id == self.resumes:
            return
        events = self._client._scheduler.watch_events(
            scheduler_pb2.WatchEventsRequest(run_id=self.run_id),
            reconnect_for_s=self._client.reconnect_for_s,
        )
        try:
            async for event in events:
                if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                    yield self._named(_result(event))
        finally:  # closed early (aclose, break): end the stream now, not at GC
            await events.aclose()  # type: ignore[attr-defined]

    def _named(self, result: Result) -> Result:
        """`result` under its task's own id (a resumed run renamed its tasks)."""
        task_id = self._aliases.get(result.task_id)
        if task_id is None:
            return result
        trajectory = result.trajectory
        if trajectory is not None:
            trajectory = trajectory.model_copy(update={"task_id": task_id})
        return result.model_copy(update={"task_id": task_id, "trajectory": trajectory})

    async def results(self) -> Results:
        """Every task's result, once the run has finished."""
        return Results([result async for result in self], run_id=self.run_id)


def _result(event: scheduler_pb2.TaskEvent) -> Result:
    trajectory: common_pb2.Trajectory | None = (
        event.trajectory if event.HasField("trajectory") else None
    )
    return Result.from_proto(event.result, trajectory)
