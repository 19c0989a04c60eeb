"""A private dockerd per test module, a busybox image, and sandbox factories."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from megaflow.env.docker import DockerEngine, DockerSandbox
from megaflow.testing.dockerd import (
    Dockerd,
    build_busybox_image,
    dockerd_available,
    prepared_dockerd,
)

IMAGE = "megaflow-busybox:test"


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    reason = dockerd_available()
    if reason is not None:
        pytest.skip(f"dockerd cannot run here: {reason}")
    with prepared_dockerd(lambda client: build_busybox_image(client, IMAGE)) as daemon:
        yield daemon


@pytest.fixture
def engine(dockerd: Dockerd) -> Iterator[DockerEngine]:
    engine = dockerd.engine()
    yield engine
    engine.close()


Factory = Callable[..., Any]


@pytest.fixture
async def make_sandbox(engine: DockerEngine) -> AsyncIterator[Factory]:
    """Start sandboxes with the test image; every one is stopped at the end."""
    made: list[DockerSandbox] = []

    async def make(**kwargs: Any) -> DockerSandbox:
        kwargs.setdefault("image", IMAGE)
        sandbox = DockerSandbox(f"t-{secrets.token_hex(3)}", engine=engine, **kwargs)
        made.append(sandbox)
        await sandbox.start()
        return sandbox

    yield make
    for sandbox in made:
        await sandbox.stop()


@pytest.fixture
async def sandbox(make_sandbox: Factory) -> DockerSandbox:
    sb: DockerSandbox = await make_sandbox()
    return sb
