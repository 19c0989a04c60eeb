"""Warm and persistent pools behind the Environment Service, and the hard cap."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from megaflow.core.errors import CapacityError, InvalidRequestError
from megaflow.env.docker.orphans import LABEL_OWNER_PID
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.testing.dockerd import (
    Dockerd,
    build_busybox_image,
    dockerd_available,
    prepared_dockerd,
)
from megaflow.testing.processes import pids_mentioning
from megaflow.v1 import common_pb2, env_pb2

pytestmark = pytest.mark.integration

PERSISTENT = common_pb2.EnvPlacement(mode="persistent")


def _config(tmp_path: Path, **kw: object) -> EnvServiceConfig:
    return EnvServiceConfig(
        root_dir=tmp_path / "sb", artifact_dir=tmp_path / "art", reap_interval_s=0.1, **kw
    )


@pytest.fixture
async def warm(tmp_path: Path) -> AsyncIterator[SandboxEnvironmentService]:
    async with SandboxEnvironmentService(_config(tmp_path, warm_pool={"host": 2})) as svc:
        await svc.warmed()
        yield svc
    assert not any((tmp_path / "sb").iterdir())


async def _create(
    svc: SandboxEnvironmentService, placement: common_pb2.EnvPlacement | None = None
) -> str:
    request = env_pb2.CreateEnvironmentRequest(owner="test")
    if placement is not None:
        request.placement.CopyFrom(placement)
    return (await svc.create_environment(request)).env_id


async def _step(svc: SandboxEnvironmentService, env_id: str, command: str) -> str:
    reply = await svc.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command=command))
    return reply.output


async def _release(svc: SandboxEnvironmentService, env_id: str) -> None:
    await svc.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def _settled(svc: SandboxEnvironmentService) -> None:
    """Wait until no sandbox is being reset or refilled."""
    for _ in range(500):
        await svc.warmed()
        if svc.pool.starting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the pool never settled")


def _sandbox_pids(workspace: Path) -> list[int]:
    """Host pids of the processes of the sandbox whose workspace is ``workspace``."""
    return list(pids_mentioning(str(workspace)))


async def test_warm_claim_is_served_from_the_pool_and_refilled(
    warm: SandboxEnvironmentService,
) -> None:
    assert warm.pool.idle == 2
    t0 = time.perf_counter()
    env_id = await _create(warm)
    warm_s = time.perf_counter() - t0
    assert warm.pool.idle == 1  # taken from the pool, not started
    assert (await _step(warm, env_id, "echo ok")).strip() == "ok"
    await _settled(warm)
    assert warm.pool.idle == 2  # refilled in the background
    # A spec with no warm pool (other limits) is a cold start.
    t0 = time.perf_counter()
    cold = await warm.create_environment(
        env_pb2.CreateEnvironmentRequest(limits=common_pb2.EnvLimits(memory_mib=300))
    )
    cold_s = time.perf_counter() - t0
    print(f"\nwarm claim {warm_s * 1000:.2f} ms, cold create {cold_s * 1000:.2f} ms")
    assert warm.pool.idle == 2
    await _release(warm, env_id)
    await _release(warm, cold.env_id)
    await _settled(warm)
    assert warm.pool.idle == 2  # ephemeral sandboxes are stopped, not pooled


async def test_persistent_sandbox_is_reset_between_tasks(tmp_path: Path) -> None:
    async with SandboxEnvironmentService(_config(tmp_path)) as svc:
        first = await _create(svc, PERSISTENT)
        sandbox_id = svc._envs[first].sandbox.sandbox_id
        await _step(
            svc,
            first,
            "export SECRET=leak; mkdir -p d && echo x > d/f && echo y > .hidden; "
            "echo t > /tmp/trace; (sleep 1000 &); cd d",
        )
        await _release(svc, first)
        await _settled(svc)
        assert svc.pool.idle == 1
        second = await _create(svc, PERSISTENT)
        assert svc._envs[second].sandbox.sandbox_id == sandbox_id  # the same sandbox, reused
        out = await _step(
            svc,
            second,
            'echo "secret=$SECRET"; pwd; ls -A; ls -A /tmp; '
            "cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
        )
        lines = out.splitlines()
        assert lines[0] == "secret="
        assert lines[1] == "/workspace"
        assert "d" not in lines and ".hidden" not in lines and "trace" not in out
        assert "sleep" not in out
        await _release(svc, second)
    assert not any((tmp_path / "sb").iterdir())


async def test_liveness_probe_discards_a_sandbox_killed_from_outside(
    warm: SandboxEnvironmentService,
) -> None:
    victims = next(q for q in warm.pool._idle.values() if q)
    dead = victims[0]
    workspace = dead.host_workspace  # type: ignore[attr-defined]
    pids = _sandbox_pids(workspace)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.1)
    env_ids = [await _create(warm), await _create(warm)]
    handed = {warm._envs[e].sandbox.sandbox_id for e in env_ids}
    assert dead.sandbox_id not in handed
    for env_id in env_ids:
        assert (await _step(warm, env_id, "echo fine")).strip() == "fine"
    await _settled(warm)
    assert not workspace.exists()  # the dead one was stopped and removed
    for env_id in env_ids:
        await _release(warm, env_id)


async def test_default_warm_size_applies_to_images_once_claimed(tmp_path: Path) -> None:
    async with SandboxEnvironmentService(_config(tmp_path, warm_pool_default=2)) as svc:
        await svc.warmed()
        assert svc.pool.idle == 0  # nothing named: nothing warmed at start
        env_id = await _create(svc)  # cold, then the pool of its spec fills up
        await _settled(svc)
        assert svc.pool.idle == 2
        odd = await svc.create_environment(
            env_pb2.CreateEnvironmentRequest(limits=common_pb2.EnvLimits(pids=99))
        )
        await _settled(svc)
        assert svc.pool.idle == 2  # other limits: no warm pool of their own
        await _release(svc, env_id)
        await _release(svc, odd.env_id)


@pytest.mark.parametrize("warm_size", [0, 4])
async def test_cap_is_atomic_under_100_concurrent_creates(tmp_path: Path, warm_size: int) -> None:
    cap = 10
    config = _config(tmp_path, max_environments=cap, warm_pool={"host": warm_size})
    async with SandboxEnvironmentService(config) as svc:
        await svc.warmed()
        peak = {"slots": 0, "dirs": 0}
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                peak["slots"] = max(peak["slots"], svc.live)
                peak["dirs"] = max(peak["dirs"], len(list((tmp_path / "sb").iterdir())))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(_create(svc) for _ in range(100)), return_exceptions=True)
        done.set()
        await sampler
        created = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if isinstance(r, CapacityError)]
        assert len(created) == cap and len(refused) == 100 - cap
        assert peak["slots"] <= cap and peak["dirs"] <= cap
        for env_id in created:
            await _release(svc, env_id)
        await _settled(svc)
        assert svc.live == svc.pool.idle <= cap
    assert not any((tmp_path / "sb").iterdir())


async def test_placement_is_validated(warm: SandboxEnvironmentService) -> None:
    with pytest.raises(InvalidRequestError, match="Docker endpoint"):
        await _create(warm, common_pb2.EnvPlacement(backend="docker"))
    with pytest.raises(
        InvalidRequestError, match=r"unknown sandbox backend 'k8s'; known: docker, local"
    ):
        await _create(warm, common_pb2.EnvPlacement(backend="k8s"))
    with pytest.raises(InvalidRequestError, match="mode"):
        await _create(warm, common_pb2.EnvPlacement(mode="sticky"))
    with pytest.raises(InvalidRequestError, match="runtime"):
        await _create(warm, common_pb2.EnvPlacement(runtime="runsc"))


DOCKER_IMAGE = "megaflow-busybox:pools"


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    reason = dockerd_available()
    if reason is not None:
        pytest.skip(f"dockerd cannot run here: {reason}")
    with prepared_dockerd(lambda client: build_busybox_image(client, DOCKER_IMAGE)) as daemon:
        yield daemon


async def test_docker_backend_pools_through_the_service(dockerd: Dockerd, tmp_path: Path) -> None:
    placement = common_pb2.EnvPlacement(backend="docker", mode="persistent")
    request = env_pb2.CreateEnvironmentRequest(
        image=DOCKER_IMAGE, placement=placement, files={"task.txt": b"task"}
    )
    async with SandboxEnvironmentService(_config(tmp_path, docker_host=dockerd.base_url)) as svc:
        first = (await svc.create_environment(request)).env_id
        sandbox_id = svc._envs[first].sandbox.sandbox_id
        assert (await _step(svc, first, "cat task.txt")).strip() == "task"
        await _step(svc, first, "export LEAK=1; echo x > extra.txt; (sleep 300 &)")
        await _release(svc, first)
        await _settled(svc)
        assert svc.pool.idle == 1
        second = (await svc.create_environment(request)).env_id
        assert svc._envs[second].sandbox.sandbox_id == sandbox_id
        out = await _step(svc, second, 'echo "leak=$LEAK"; ls -A; ps')
        assert "leak=\n" in out and "task.txt" in out and "extra.txt" not in out
        assert "sleep 300" not in out
        await _release(svc, second)
    client = dockerd.client()
    try:
        assert client.api.containers(all=True, filters={"label": LABEL_OWNER_PID}) == []
    finally:
        client.close()


_DOCKER_ORPHAN_MAKER = """
import asyncio, sys
from pathlib import Path
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.v1 import common_pb2, env_pb2

async def main() -> None:
    root, docker_host, image = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    svc = SandboxEnvironmentService(EnvServiceConfig(root_dir=root, docker_host=docker_host))
    await svc.start()
    for backend in ("docker", "docker", "local"):
        placement = common_pb2.EnvPlacement(backend=backend)
        request = env_pb2.CreateEnvironmentRequest(
            image=image if backend == "docker" else "", placement=placement
        )
        await svc.create_environment(request)
    print(svc.live, flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


async def test_restart_reclaims_containers_of_a_killed_service(
    dockerd: Dockerd, tmp_path: Path
) -> None:
    root = tmp_path / "sb"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DOCKER_ORPHAN_MAKER,
        str(root),
        dockerd.base_url,
        DOCKER_IMAGE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
        assert int(line) == 3
    finally:
        proc.kill()
        await proc.wait()
    client = dockerd.client()
    try:
        label = {"label": LABEL_OWNER_PID}
        assert len(client.api.containers(all=True, filters=label)) == 2
        async with SandboxEnvironmentService(_config(tmp_path, docker_host=dockerd.base_url)):
            pass
        assert client.api.containers(all=True, filters=label) == []
        assert not any(root.iterdir())
    finally:
        client.close()
