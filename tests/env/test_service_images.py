"""Images on demand through the Environment Service: a task names a registry image, the
local backend pulls it once, runs its sandboxes on it and unpins it at release."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.env.images import ImageNotFoundError
from megaflow.env.images.build import build_busybox_rootfs
from megaflow.env.local.backend import LocalBackend
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.testing.registry import LocalRegistry, push_rootfs
from megaflow.v1 import env_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry_image(tmp_path: Path) -> AsyncIterator[str]:
    registry = LocalRegistry(tmp_path / "registry")
    await registry.start()
    try:
        rootfs = build_busybox_rootfs(tmp_path / "busybox")
        await push_rootfs(registry.address, "megaflow/busybox", "1", rootfs)
        yield f"docker://{registry.address}/megaflow/busybox:1"
    finally:
        registry.stop()


def service_config(tmp_path: Path, image: str) -> EnvServiceConfig:
    """The service's settings, with the image's registry (plain HTTP) allowed."""
    host = image.removeprefix("docker://").split("/")[0]
    return EnvServiceConfig(
        root_dir=tmp_path / "sb", image_cache_dir=tmp_path / "images", insecure_registries=(host,)
    )


async def test_tasks_run_on_an_image_pulled_once(registry_image: str, tmp_path: Path) -> None:
    config = service_config(tmp_path, registry_image)
    async with SandboxEnvironmentService(config) as service:
        request = env_pb2.CreateEnvironmentRequest(image=registry_image, files={"a.txt": b"hi\n"})
        created = await asyncio.gather(*(service.create_environment(request) for _ in range(8)))
        local = service.factory.backend("local")
        assert isinstance(local, LocalBackend)
        assert local.image_store().pulls == 1  # eight environments, one pull
        step = await service.execute_step(
            env_pb2.ExecuteStepRequest(
                env_id=created[0].env_id,
                command="cat a.txt; readlink -f /usr/bin/ls; test -e /usr/bin/python3; echo $?",
            )
        )
        lines = step.output.split()
        assert lines[0] == "hi"
        assert lines[1].endswith("busybox")  # the image's tools, not the host's
        assert lines[2] == "1"  # the host's python is not in this image
        for c in created:
            await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=c.env_id))
        assert not local._pinned  # every pin released with its sandbox


async def test_an_unknown_image_is_a_clear_error(registry_image: str, tmp_path: Path) -> None:
    config = service_config(tmp_path, registry_image)
    # registry: is the older spelling of docker:// (same rules).
    missing = registry_image.replace("busybox:1", "nothing:9").replace("docker://", "registry:")
    async with SandboxEnvironmentService(config) as service:
        with pytest.raises(ImageNotFoundError, match="nothing"):
            await service.create_environment(env_pb2.CreateEnvironmentRequest(image=missing))
        with pytest.raises(Exception, match="not available to the local backend"):
            await service.create_environment(env_pb2.CreateEnvironmentRequest(image="ubuntu"))


async def test_a_warm_pool_of_a_missing_image_only_warns(
    registry_image: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = registry_image.replace("busybox:1", "nothing:9")
    config = service_config(tmp_path, registry_image).model_copy(update={"warm_pool": {missing: 2}})
    async with SandboxEnvironmentService(config) as service:
        await service.pool.wait_refills()
        assert any("warm pool refill of" in r.getMessage() for r in caplog.records)
        assert service.pool.slots == 0  # the failed refill gave its slot back
        created = await service.create_environment(
            env_pb2.CreateEnvironmentRequest(image=registry_image)
        )
        await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=created.env_id))
