"""Health of environments: dead sandboxes are detected and released, budgets hold, load."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import NotFoundError, SandboxError
from megaflow.env.local.freezer import request_freeze
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.v1 import common_pb2, env_pb2
from tests.env.test_pools import _sandbox_pids

pytestmark = pytest.mark.integration


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[SandboxEnvironmentService]:
    config = EnvServiceConfig(
        root_dir=tmp_path / "sb", max_environments=6, warm_pool={"host": 1}, reap_interval_s=0.1
    )
    async with SandboxEnvironmentService(config) as svc:
        await svc.warmed()
        yield svc
    assert not any((tmp_path / "sb").iterdir())


def _kill_from_outside(svc: SandboxEnvironmentService, env_id: str) -> Path:
    workspace: Path = svc._envs[env_id].sandbox.host_workspace  # type: ignore[attr-defined]
    pids = _sandbox_pids(workspace)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return workspace


@pytest.mark.parametrize("mode", ["ephemeral", "persistent"])
@pytest.mark.parametrize("call", ["step", "observe", "action"])
async def test_sandbox_killed_from_outside_raises_sandbox_error_and_is_released(
    service: SandboxEnvironmentService, mode: str, call: str
) -> None:
    request = env_pb2.CreateEnvironmentRequest(placement=common_pb2.EnvPlacement(mode=mode))
    env_id = (await service.create_environment(request)).env_id
    step = env_pb2.ExecuteStepRequest(env_id=env_id, command="export X=1; echo ok")
    assert (await service.execute_step(step)).output.strip() == "ok"
    workspace = _kill_from_outside(service, env_id)
    await asyncio.sleep(0.05)
    with pytest.raises(SandboxError, match="died"):
        if call == "step":
            await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="echo $X"))
        elif call == "observe":
            await service.get_observation(env_pb2.GetObservationRequest(env_id=env_id))
        else:
            read = env_pb2.ReadFile(path="x")
            await service.submit_action(env_pb2.SubmitActionRequest(env_id=env_id, read_file=read))
    assert SandboxError.retryable  # the scheduler retries the task elsewhere
    assert not workspace.exists()  # released and removed, not pooled
    with pytest.raises(NotFoundError):
        await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="true"))


async def test_a_hung_sandbox_fails_its_step_as_infrastructure_and_is_released(
    service: SandboxEnvironmentService,
) -> None:
    env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
    sandbox = service._envs[env_id].sandbox
    control = sandbox._cgroups.freezer_file  # type: ignore[attr-defined]
    if control is None:
        pytest.skip("this machine has no cgroup freezer")
    request_freeze(control, True)  # the sandbox hangs (as under `docker pause`)
    step = env_pb2.ExecuteStepRequest(env_id=env_id, command="echo hi", timeout_s=0.3)
    with pytest.raises(SandboxError, match="hung") as caught:
        await service.execute_step(step)
    assert caught.value.retryable  # retried elsewhere, never scored
    assert not sandbox.host_workspace.exists()  # type: ignore[attr-defined]
    with pytest.raises(NotFoundError):
        await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="true"))


async def test_sandbox_error_crosses_grpc_as_retryable(service: SandboxEnvironmentService) -> None:
    async with GrpcServer("127.0.0.1:0", {"env": service}) as server:
        client = EnvironmentServiceClient(server.address)
        env_id = (await client.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
        _kill_from_outside(service, env_id)
        await asyncio.sleep(0.05)
        with pytest.raises(SandboxError) as caught:
            await client.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="true"))
        assert caught.value.retryable
        await client.close()


async def test_silent_command_past_its_budget_is_killed(service: SandboxEnvironmentService) -> None:
    env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
    slow = env_pb2.ExecuteStepRequest(env_id=env_id, command="sleep 30", timeout_s=0.3)
    reply = await service.execute_step(slow)
    assert reply.timed_out and reply.exit_code == 137
    after = await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="echo up"))
    assert after.output.strip() == "up"  # the environment stays usable
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_agent_exit_is_not_an_infrastructure_failure(
    service: SandboxEnvironmentService,
) -> None:
    env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
    bye = await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="exit 3"))
    assert bye.exit_code == 3
    again = await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="echo a"))
    assert again.output.strip() == "a"
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_health_and_load_report_the_counts(service: SandboxEnvironmentService) -> None:
    assert service.load() == (0, 6)  # one pooled sandbox is free capacity
    env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
    await service.warmed()
    assert service.load() == (1, 6)
    detail = (await service.health(common_pb2.HealthRequest())).detail
    assert detail.startswith("2/6 environments") and "1 in use" in detail and "1 pooled" in detail
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    assert service.load() == (0, 6)
