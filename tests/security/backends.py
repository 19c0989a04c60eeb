"""The backends the containment battery runs on, and Docker helpers read on the host.

``local`` is bubblewrap; ``docker`` is runc on the session's private dockerd
(`megaflow.testing.dockerd`) with `DOCKER_IMAGE` (busybox, bash, python3 and
`megaflow.testing.images.SECURITY_TOOLS`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from megaflow.testing.dockerd import Dockerd
from megaflow.v1 import common_pb2, env_pb2
from tests.security import hoststate

BACKENDS = ("local", "docker")
DOCKER_IMAGE = "megaflow-security:test"
DOCKER_RUNTIME = "runc"


def env_request(backend: str, **fields: Any) -> env_pb2.CreateEnvironmentRequest:
    """A CreateEnvironmentRequest on ``backend`` (Docker: the battery's image, runc)."""
    if backend == "docker":
        fields.setdefault("image", DOCKER_IMAGE)
        placement = common_pb2.EnvPlacement()
        if fields.get("placement") is not None:
            placement.CopyFrom(fields["placement"])  # keeps the mode (persistent...)
        placement.backend, placement.runtime = "docker", DOCKER_RUNTIME
        fields["placement"] = placement
    return env_pb2.CreateEnvironmentRequest(**fields)


def parametrize_backends(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend`` over `BACKENDS`, less what ``only_backends`` excludes, with
    ``hole_on``'s backend as xfail(strict=True)."""
    backends: tuple[str, ...] = BACKENDS
    marker = metafunc.definition.get_closest_marker("only_backends")
    if marker is not None:
        if not marker.kwargs.get("reason"):
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: only_backends needs reason=")
        backends = tuple(b for b in BACKENDS if b in marker.args)
    holes = {}
    for hole in metafunc.definition.iter_markers("hole_on"):
        if not hole.kwargs.get("reason"):
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: hole_on needs reason=")
        holes[hole.args[0]] = pytest.mark.xfail(strict=True, reason=hole.kwargs["reason"])
    metafunc.parametrize(
        "backend", [pytest.param(b, marks=holes[b]) if b in holes else b for b in backends]
    )


def sandbox_containers(dockerd: Dockerd) -> list[dict[str, Any]]:
    """``docker inspect`` of every container (running or not) labelled as a sandbox."""
    api = dockerd.api()
    try:
        found = api.containers(all=True, filters={"label": hoststate.DOCKER_SANDBOX_LABEL})
        return [api.inspect_container(c["Id"]) for c in found]
    finally:
        api.close()


def docker_workspace_holding(dockerd: Dockerd, text: bytes) -> tuple[Path, str]:
    """The host path of /workspace (in the overlay MergedDir) of the one container whose
    victim.txt holds ``text``, and that container's id."""
    found = []
    for info in sandbox_containers(dockerd):
        merged = Path(info["GraphDriver"]["Data"]["MergedDir"], "workspace")
        with contextlib.suppress(OSError):
            if (merged / "victim.txt").read_bytes() == text:
                found.append((merged, str(info["Id"])))
    assert len(found) == 1, found
    return found[0]
