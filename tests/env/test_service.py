"""The Environment Service over real sandboxes: the step API, scoring, leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import CapacityError, InvalidRequestError, NotFoundError
from megaflow.env.service import EnvServiceConfig, LocalEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.tasks.swe_synth import generate_tasks, reference_patch, wrong_patch
from megaflow.v1 import common_pb2, env_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[LocalEnvironmentService]:
    svc = LocalEnvironmentService(
        EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=4, reap_interval_s=0.1)
    )
    async with svc:
        yield svc
    assert not any((tmp_path / "sb").iterdir())


def _create(task: common_pb2.TaskSpec, **kw: float) -> env_pb2.CreateEnvironmentRequest:
    return env_pb2.CreateEnvironmentRequest(
        owner="test",
        image=task.image,
        files=task.files,
        hidden_files=task.hidden_files,
        eval_command=task.eval_command,
        **kw,
    )


async def _score(
    svc: LocalEnvironmentService, task: common_pb2.TaskSpec, patch: tuple[str, str, str]
) -> float:
    env_id = (await svc.create_environment(_create(task))).env_id
    path, old, new = patch
    edit = await svc.submit_action(
        env_pb2.SubmitActionRequest(
            env_id=env_id, edit_file=env_pb2.EditFile(path=path, old=old, new=new)
        )
    )
    assert edit.ok, edit.message
    reply = await svc.submit_action(
        env_pb2.SubmitActionRequest(env_id=env_id, submit=env_pb2.Submit())
    )
    await svc.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    assert reply.has_reward
    return reply.reward


async def test_hidden_tests_decide_the_reward(service: LocalEnvironmentService) -> None:
    task = generate_tasks(1, seed=11)[0]
    assert await _score(service, task, reference_patch(task)) == 1.0
    assert await _score(service, task, wrong_patch(task)) == 0.0


async def test_hidden_tests_are_invisible_before_submit(service: LocalEnvironmentService) -> None:
    task = generate_tasks(1, seed=5)[0]
    env_id = (await service.create_environment(_create(task))).env_id
    listing = await service.execute_step(
        env_pb2.ExecuteStepRequest(env_id=env_id, command="find . -type f")
    )
    for hidden in task.hidden_files:
        assert hidden not in listing.output
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_step_api_over_grpc(service: LocalEnvironmentService) -> None:
    task = generate_tasks(1, seed=2)[0]
    async with GrpcServer("127.0.0.1:0", {"env": service}) as server:
        client = EnvironmentServiceClient(server.address)
        env_id = (await client.create_environment(_create(task))).env_id
        step = await client.execute_step(
            env_pb2.ExecuteStepRequest(env_id=env_id, command="cd tests && export X=42")
        )
        assert step.exit_code == 0
        step = await client.execute_step(
            env_pb2.ExecuteStepRequest(env_id=env_id, command="echo $X; pwd")
        )
        assert step.output.split() == ["42", "/workspace/tests"]
        obs = await client.get_observation(env_pb2.GetObservationRequest(env_id=env_id))
        assert obs.alive and obs.cwd == "/workspace/tests" and obs.steps == 2
        wrote = await client.submit_action(
            env_pb2.SubmitActionRequest(
                env_id=env_id, write_file=env_pb2.WriteFile(path="notes.txt", content=b"hi")
            )
        )
        assert wrote.ok
        read = await client.submit_action(
            env_pb2.SubmitActionRequest(env_id=env_id, read_file=env_pb2.ReadFile(path="notes.txt"))
        )
        assert read.content == b"hi"
        missing = await client.submit_action(
            env_pb2.SubmitActionRequest(
                env_id=env_id, edit_file=env_pb2.EditFile(path="notes.txt", old="absent", new="x")
            )
        )
        assert not missing.ok and "not found" in missing.message
        with pytest.raises(InvalidRequestError, match="empty"):
            await client.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="  "))
        await client.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
        with pytest.raises(NotFoundError):
            await client.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="true"))
        await client.close()


async def test_bad_paths_and_images_are_rejected(service: LocalEnvironmentService) -> None:
    with pytest.raises(InvalidRequestError, match="inside the workspace"):
        await service.create_environment(env_pb2.CreateEnvironmentRequest(files={"../x": b""}))
    with pytest.raises(InvalidRequestError, match="image"):
        await service.create_environment(env_pb2.CreateEnvironmentRequest(image="ubuntu:22.04"))


async def test_capacity_is_a_hard_cap(service: LocalEnvironmentService) -> None:
    created = await asyncio.gather(
        *(service.create_environment(env_pb2.CreateEnvironmentRequest()) for _ in range(4))
    )
    with pytest.raises(CapacityError):
        await service.create_environment(env_pb2.CreateEnvironmentRequest())
    for c in created:
        await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=c.env_id))


async def test_expired_lease_releases_the_sandbox(service: LocalEnvironmentService) -> None:
    created = await service.create_environment(env_pb2.CreateEnvironmentRequest(lease_s=0.2))
    await asyncio.sleep(0.6)
    with pytest.raises(NotFoundError):
        await service.execute_step(
            env_pb2.ExecuteStepRequest(env_id=created.env_id, command="true")
        )
