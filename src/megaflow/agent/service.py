"""The Agent Service: hosts many agent loops in one process, as asyncio tasks.

With a `store` (the task ledger) its agents checkpoint as they run (`CheckpointConfig`)
and an attempt whose `RunTaskRequest.resume` carries an earlier attempt's checkpoint
continues from it.
"""

from __future__ import annotations

import asyncio

from megaflow.agent.checkpoint import CheckpointConfig, CheckpointWriter
from megaflow.agent.scaffold import scaffold_factory
from megaflow.agent.session import AgentLimits, TaskSession
from megaflow.core.errors import (
    CancelledTaskError,
    CapacityError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from megaflow.rpc.resolver import ServiceResolver
from megaflow.store.ledger import TaskLedger
from megaflow.v1 import agent_pb2, common_pb2


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AgentServiceImpl:
    """Runs `RunTaskRequest`s: each task's scaffold (`TaskSpec.scaffold`; default the
    built-in tool agent) in a `TaskSession`."""

    def __init__(
        self,
        resolver: ServiceResolver,
        *,
        capacity: int = 10_000,
        limits: AgentLimits | None = None,
        store: TaskLedger | None = None,
        checkpoints: CheckpointConfig | None = None,
        own_store: bool = False,
    ) -> None:
        """`store`: where agents checkpoint (None: they do not); `own_store`: this service
        opens and closes it (False when it is shared, e.g. the scheduler's ledger)."""
        self.resolver = resolver
        self.capacity = capacity
        self.limits = limits or AgentLimits()
        self.store = store
        self.own_store = own_store
        self.checkpoints = checkpoints or CheckpointConfig()
        self.writer = (
            CheckpointWriter(store, self.checkpoints)
            if store is not None and self.checkpoints.every_turns > 0
            else None
        )
        self._stopping = False
        self._running: dict[str, asyncio.Task[agent_pb2.RunTaskResponse]] = {}
        self._runners: set[asyncio.Task[agent_pb2.RunTaskResponse]] = set()  # incl. abandoned

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def run_task(self, request: agent_pb2.RunTaskRequest) -> agent_pb2.RunTaskResponse:
        task = request.task
        if not task.task_id:
            raise InvalidRequestError("RunTaskRequest.task.task_id is empty")
        if not request.attempt_id:
            raise InvalidRequestError("RunTaskRequest.attempt_id is empty")
        if request.attempt_id in self._running:
            raise InvalidRequestError(f"attempt {request.attempt_id!r} is already running here")
        if len(self._running) >= self.capacity:
            raise CapacityError(f"agent service is at its capacity of {self.capacity} tasks")
        scaffold = scaffold_factory(task.scaffold if task.HasField("scaffold") else None)
        agent = TaskSession(
            task,
            request.attempt_id,
            env=self.resolver.env(request.env_address),
            model=self.resolver.model(request.model_address),
            limits=self.limits,
            scaffold=scaffold,
            checkpoints=self.writer,
            checkpoint_every=self.checkpoints.every_turns,
            resume=request.resume if request.HasField("resume") else None,
        )
        runner = asyncio.create_task(self._run(agent), name=f"agent-{request.attempt_id}")
        self._running[request.attempt_id] = runner
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        try:
            return await asyncio.shield(runner)
        except asyncio.CancelledError:
            if runner.cancelled() and not _current_task_cancelling():
                # CancelTask stopped the agent, not our caller: a typed error.
                if self._stopping:  # not the task's fault: retried, resumed elsewhere
                    raise ServiceUnavailableError(
                        f"agent service stopped; attempt {request.attempt_id} interrupted"
                    ) from None
                raise CancelledTaskError(f"attempt {request.attempt_id} was cancelled") from None
            runner.cancel()  # our caller went away: stop the agent; stop() awaits it
            raise
        finally:
            self._running.pop(request.attempt_id, None)

    async def _run(self, agent: TaskSession) -> agent_pb2.RunTaskResponse:
        await agent.run()
        return agent.response  # holds the result and trajectory (built in place)

    async def cancel_task(
        self, request: agent_pb2.CancelTaskRequest
    ) -> agent_pb2.CancelTaskResponse:
        runner = self._running.get(request.attempt_id)
        if runner is not None:
            runner.cancel()
        return agent_pb2.CancelTaskResponse(found=runner is not None)

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(ok=True, detail=f"{self.in_flight}/{self.capacity} tasks")

    async def start(self) -> None:
        if self.store is not None and self.own_store:
            await self.store.open()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Cancel every agent loop and wait until each has released its environment (and
        flushed its latest checkpoint, for the attempt that resumes it)."""
        self._stopping = True
        runners = list(self._runners)
        for runner in runners:
            if not runner.cancelling():  # a second cancel would interrupt its cleanup
                runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        if self.writer is not None:
            await self.writer.close()
        if self.store is not None and self.own_store:
            await self.store.close()
