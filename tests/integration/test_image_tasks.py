"""Images on demand at the task level: 100 tasks asking at once for one uncached image
cause exactly one pull; a missing image fails its tasks as infrastructure, naming it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.agent.session import AgentLimits
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.images.build import build_busybox_rootfs
from megaflow.env.local.backend import LocalBackend
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.registry import LocalRegistry, push_rootfs
from megaflow.testing.scripted import ScriptedBackend, tool_call

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path / "registry")
    await reg.start()
    try:
        await push_rootfs(
            reg.address, "megaflow/busybox", "1", build_busybox_rootfs(tmp_path / "fs")
        )
        yield reg
    finally:
        reg.stop()


async def _run(tmp_path: Path, image: str, n: int) -> tuple[RunSummary, int]:
    """The run's summary and how many image pulls it caused."""
    system = EmbeddedSystem(
        backends=[ScriptedBackend(lambda task, i: tool_call("submit"))],
        ledger_path=tmp_path / "ledger.sqlite",
        env_config=EnvServiceConfig(
            root_dir=tmp_path / "sb", image_cache_dir=tmp_path / "images", max_environments=n
        ),
        agent_limits=AgentLimits(max_steps=2),
        policy=SchedulerPolicy(default_max_attempts=2, retry_base_s=0.05),
    )
    tasks = generate_tasks(n, seed=1)
    for task in tasks:
        task.image = image
    async with system:
        summary = await run_batch(system.scheduler, tasks, tmp_path / "out", max_concurrency=n)
        assert isinstance(system.env, SandboxEnvironmentService)
        local = system.env.factory.backend("local")
        assert isinstance(local, LocalBackend)
        pulls = local.image_store().pulls
    return summary, pulls


async def test_hundred_tasks_one_pull(registry: LocalRegistry, tmp_path: Path) -> None:
    summary, pulls = await _run(tmp_path, f"registry:{registry.address}/megaflow/busybox:1", 100)
    assert summary.finished == 100
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in summary.records)
    assert pulls == 1


async def test_missing_image_fails_tasks_as_infrastructure(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    image = f"registry:{registry.address}/megaflow/nothing:9"
    summary, _ = await _run(tmp_path, image, 5)
    for record in summary.records:
        assert (record["status"], record["error_kind"], record["reward"]) == (
            "failed",
            "infra",
            None,
        )
        assert record["attempts"] == 2  # retried first
        assert "megaflow/nothing:9" in record["error"]
