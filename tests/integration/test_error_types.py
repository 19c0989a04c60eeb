"""Errors keep their types across the services: a `SandboxError` raised in an
Environment Service reaches the agent, the scheduler and the client as a
`SandboxError` (its class carried beside the message over gRPC, never parsed out of
it), and an unreachable service is named by the error's address, not its text."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import megaflow
from megaflow.agent.service import AgentServiceImpl
from megaflow.core.errors import SandboxError, ServiceUnavailableError
from megaflow.deploy.processes import serve
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.resolver import ServiceResolver
from megaflow.rpc.server import GrpcServer
from megaflow.scheduler import state as s
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_env import SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import env_pb2

pytestmark = pytest.mark.integration


class BrokenEnv(SimulatedEnvironmentService):
    """An Environment Service whose sandboxes never start."""

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        raise SandboxError("no space left for the workspace")

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        raise ServiceUnavailableError("the disk is gone", address="10.0.0.9:7072")


async def test_a_sandbox_error_keeps_its_type_over_grpc() -> None:
    async with GrpcServer("127.0.0.1:0", {"env": BrokenEnv()}) as server:
        client = EnvironmentServiceClient(server.address, timeout_s=10.0)
        try:
            with pytest.raises(SandboxError) as raised:
                await client.create_environment(env_pb2.CreateEnvironmentRequest())
            assert str(raised.value) == "no space left for the workspace"  # no class prefix
            with pytest.raises(ServiceUnavailableError) as unreachable:
                await client.release_environment(env_pb2.ReleaseEnvironmentRequest())
            assert unreachable.value.address == "10.0.0.9:7072"
        finally:
            await client.close()
    gone = EnvironmentServiceClient(server.address, timeout_s=5.0)  # nobody listens now
    try:
        with pytest.raises(ServiceUnavailableError) as refused:
            await gone.create_environment(env_pb2.CreateEnvironmentRequest())
        assert refused.value.address == server.address
    finally:
        await gone.close()


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[tuple[str, list[s.Event]]]:
    """Scheduler, model, agent and a broken env, each its own gRPC server (in this
    process); yields the scheduler's address and the events its state machine got."""
    scheduler = SchedulerServiceImpl(SqliteLedger(tmp_path / "ledger.sqlite"), ServiceResolver())
    seen: list[s.Event] = []
    feed = scheduler._feed

    def record(event: s.Event) -> None:
        seen.append(event)
        feed(event)

    scheduler._feed = record  # type: ignore[method-assign]
    stop = asyncio.Event()
    async with GrpcServer("127.0.0.1:0", {"scheduler": scheduler}) as server:
        await scheduler.start()
        resolver = ServiceResolver()
        services = [
            ("model", ModelServiceImpl([SimulatedBackend.fast()])),
            ("agent", AgentServiceImpl(resolver, capacity=8)),
            ("env", BrokenEnv()),
        ]
        runs = [
            asyncio.create_task(
                serve(
                    kind,
                    impl,
                    listen="127.0.0.1:0",
                    scheduler=server.address,
                    capacity=8,
                    stop=stop,
                )
            )
            for kind, impl in services
        ]
        try:
            while len(scheduler.state.services) < 3:
                await asyncio.sleep(0.05)
            yield server.address, seen
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)
            await resolver.close()
            await scheduler.stop()


async def test_a_sandbox_error_reaches_the_scheduler_and_the_client_as_such(
    deployment: tuple[str, list[s.Event]],
) -> None:
    address, seen = deployment
    task = generate_tasks(1)[0]
    task.max_attempts = 2
    async with megaflow.connect(address) as client:
        (result,) = await client.submit([task]).results()
    failures = [e for e in seen if isinstance(e, s.AttemptFailed)]
    assert [f.error_type for f in failures] == ["SandboxError", "SandboxError"]
    assert all(f.error_kind == megaflow.SandboxError.kind for f in failures)
    assert (result.status, result.error_kind, result.reward) == ("failed", "infra", None)
    assert result.error_type == "SandboxError"  # a field of the result, not parsed
    assert result.attempts == 2
    assert "SandboxError: no space left for the workspace" in result.error
    assert "SandboxError: SandboxError" not in result.error  # the class once, not re-parsed
