"""The simulated Environment Service: an embedded run scores like the real sandboxes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import run_batch
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend, SimulatedPolicy
from megaflow.v1 import common_pb2, env_pb2


async def test_embedded_run_on_the_simulated_env_gets_the_policy_rewards(tmp_path: Path) -> None:
    env = SimulatedEnvironmentService(SimulatedEnvConfig(step_latency_s=0.001))
    system = EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=0.5)],
        ledger_path=tmp_path / "ledger.sqlite",
        env=env,
    )
    async with system:
        summary = await run_batch(system.scheduler, generate_tasks(40), tmp_path / "out")
    policy = SimulatedPolicy(success_rate=0.5, seed=0)
    assert summary.finished == 40
    for record in summary.records:
        assert record["status"] == "succeeded"
        assert record["reward"] == (1.0 if policy.solves(record["task_id"]) else 0.0)
    assert env.live == 0 and env.created == 40  # every environment released


async def test_simulated_warm_pool_hits_misses_and_refills_after_release() -> None:
    env = SimulatedEnvironmentService(
        SimulatedEnvConfig(warm_pool={"py": 2}, create_latency_s=0.0, refill_latency_s=0.01)
    )
    created = [
        await env.create_environment(env_pb2.CreateEnvironmentRequest(image=image))
        for image in ("py", "py", "py", "node")
    ]
    assert (env.warm_hits, env.cold_creates) == (2, 2)  # the third py and node are cold
    assert env.idle_warm("py") == 0
    await env.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=created[0].env_id))
    await env.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=created[2].env_id))
    assert env.idle_warm("py") == 0  # refilled only after refill_latency_s
    for _ in range(100):
        if env.idle_warm("py") == 1:
            break
        await asyncio.sleep(0.01)
    assert env.idle_warm("py") == 1  # only the warm one is replaced: the pool never overfills
    await env.create_environment(env_pb2.CreateEnvironmentRequest(image="py"))
    assert env.warm_hits == 3
    assert dict(env.advertised().warm_images) == {"py": 2}
    await env.stop()


async def test_simulated_release_by_owner_releases_that_owners_environments() -> None:
    env = SimulatedEnvironmentService(SimulatedEnvConfig(create_latency_s=0.0))
    for owner in ("a1", "a1", "b1"):
        await env.create_environment(env_pb2.CreateEnvironmentRequest(owner=owner))
    reply = await env.release_environment(env_pb2.ReleaseEnvironmentRequest(owner="a1"))
    assert reply.released == 2 and env.live == 1
    reply = await env.release_environment(env_pb2.ReleaseEnvironmentRequest(owner="a1"))
    assert reply.released == 0 and env.live == 1
    with pytest.raises(InvalidRequestError, match="exactly one"):
        await env.release_environment(env_pb2.ReleaseEnvironmentRequest())


async def test_simulated_env_accepts_and_ignores_workspaces_and_setup_commands() -> None:
    env = SimulatedEnvironmentService(SimulatedEnvConfig())
    git = common_pb2.GitSource(url="/nowhere", commit="abc")
    created = await env.create_environment(
        env_pb2.CreateEnvironmentRequest(
            files={"a.txt": b"a"},
            workspace=common_pb2.WorkspaceSource(git=git),
            setup_commands=["exit 1"],
        )
    )
    step = await env.execute_step(
        env_pb2.ExecuteStepRequest(env_id=created.env_id, command="cat a.txt")
    )
    assert step.output == "a" and step.exit_code == 0
