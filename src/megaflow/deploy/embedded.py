"""The embedded deployment: scheduler, Model, Agent and Environment services in one
process, talking through the in-process transport."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from megaflow.agent.checkpoint import CheckpointConfig
from megaflow.agent.service import AgentServiceImpl
from megaflow.agent.session import AgentLimits
from megaflow.contract import EnvironmentService
from megaflow.core.errors import InvalidRequestError
from megaflow.core.runtime import GcPolicy, GcTuner
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.backend import ModelBackend
from megaflow.model.service import ModelServiceConfig, ModelServiceImpl
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.scheduler.state import KIND_AGENT, KIND_ENV, KIND_MODEL, SchedulerPolicy
from megaflow.store.ledger import TaskLedger
from megaflow.store.sqlite import SqliteLedger


class _EnvCapacity(Protocol):
    @property
    def max_environments(self) -> int: ...


class EmbeddedEnvironment(EnvironmentService, Protocol):
    """An Environment Service this process hosts: the contract, a lifecycle, and how
    many environments it holds at once (`config.max_environments`)."""

    @property
    def config(self) -> _EnvCapacity: ...

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 0.0) -> None: ...


class EmbeddedSystem:
    """All four roles in this process. Use as `async with EmbeddedSystem(...) as system`."""

    def __init__(
        self,
        *,
        backends: list[ModelBackend],
        ledger_path: Path | None = None,
        ledger: TaskLedger | None = None,
        env_config: EnvServiceConfig | None = None,
        env: EmbeddedEnvironment | None = None,
        model_config: ModelServiceConfig | None = None,
        agent_capacity: int = 10_000,
        agent_limits: AgentLimits | None = None,
        policy: SchedulerPolicy | None = None,
        gc_policy: GcPolicy | None = None,
        checkpoints: CheckpointConfig | None = None,
    ) -> None:
        """`ledger`: the task ledger (any `TaskLedger`, opened and closed by the
        scheduler); or `ledger_path`: a SQLite ledger in that file (one of the two).
        `env`: the Environment Service (default: the local bubblewrap one, from
        `env_config`). `checkpoints`: how agents checkpoint to the scheduler's ledger
        (default: after every turn; `CheckpointConfig(every_turns=0)`: off)."""
        if ledger is None and ledger_path is not None:
            ledger = SqliteLedger(ledger_path)
        elif ledger is None or ledger_path is not None:
            raise InvalidRequestError("EmbeddedSystem needs one of ledger and ledger_path")
        self.gc = GcTuner(gc_policy)
        self.model = ModelServiceImpl(backends, config=model_config)
        # `env` replaces the default local (bubblewrap) service, e.g. with the simulated one.
        self.env: EmbeddedEnvironment = (
            env if env is not None else SandboxEnvironmentService(env_config)
        )
        self.resolver = ServiceResolver(model=self.model, env=self.env)
        self.ledger: TaskLedger = ledger  # opened and closed by the scheduler
        self.agent = AgentServiceImpl(
            self.resolver,
            capacity=agent_capacity,
            limits=agent_limits,
            store=self.ledger,
            checkpoints=checkpoints,
        )
        self.resolver.set_local("agent", self.agent)
        self.scheduler = SchedulerServiceImpl(self.ledger, self.resolver, policy=policy)

    async def start(self) -> None:
        await self.env.start()
        await self.model.start()
        await self.agent.start()
        await self.scheduler.start()
        self.scheduler.register_local(KIND_MODEL, 10_000)
        self.scheduler.register_local(KIND_ENV, self.env.config.max_environments)
        self.scheduler.register_local(KIND_AGENT, self.agent.capacity)
        self.gc.start()

    async def stop(self, grace_s: float = 0.0) -> None:
        await self.gc.stop()
        await self.scheduler.stop(grace_s)
        await self.agent.stop(grace_s)
        await self.env.stop(grace_s)
        await self.model.stop(grace_s)
        await self.resolver.close()

    async def __aenter__(self) -> EmbeddedSystem:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
