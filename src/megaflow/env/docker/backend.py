"""The ``docker`` sandbox backend: a container per sandbox (`DockerSandbox`), runc or
gVisor (``runsc``), on the Docker Engine at ``docker_host``.

The backend exists only where the service has a Docker endpoint (its own
``docker_host`` setting, else the service's); one daemon connection serves every
sandbox. Reclaiming removes the labelled containers of dead earlier owners.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.config import EnvServiceConfig
from megaflow.env.docker import hardening
from megaflow.env.docker.engine import DockerEngine
from megaflow.env.docker.orphans import reclaim_orphan_containers
from megaflow.env.docker.sandbox import DockerSandbox
from megaflow.env.registry import SandboxSpec
from megaflow.env.sandbox import Capabilities, Sandbox

log = logging.getLogger(__name__)

DEFAULT_CPU_SHARES = 1024
"""Docker's own default CPU weight, when a task gives none."""

RUNTIMES = ("runc", "runsc")


class DockerBackendConfig(BaseModel):
    """Settings of the docker backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    docker_host: str | None = Field(
        default=None,
        description="Docker Engine endpoint (unix:///path/docker.sock); None: the service's "
        "`docker_host`.",
    )
    workspace_mib: int = Field(
        default=hardening.DEFAULT_WORKSPACE_MIB,
        ge=1,
        description="Default size quota of /workspace (a task's limits.disk_mib overrides it).",
    )
    tmp_mib: int = Field(default=hardening.DEFAULT_TMP_MIB, ge=1, description="/tmp's size quota.")
    inodes: int = Field(
        default=hardening.DEFAULT_INODES, ge=64, description="Inode quota of /workspace and /tmp."
    )
    user: str = Field(
        default=hardening.DEFAULT_USER,
        description="uid:gid of the workload; 'root' only for runsc sandboxes or on a "
        "userns-remapped daemon (else each create fails with a clear error).",
    )


class DockerBackend:
    """Builds `DockerSandbox`es on one daemon connection."""

    name: ClassVar[str] = "docker"
    config_class: ClassVar[type[BaseModel]] = DockerBackendConfig
    capabilities: ClassVar[Capabilities] = DockerSandbox.capabilities

    def __init__(self, service: EnvServiceConfig, config: Any = None) -> None:
        own = config if isinstance(config, DockerBackendConfig) else DockerBackendConfig()
        host = own.docker_host or service.docker_host
        if host is None:
            raise InvalidRequestError(
                "placement.backend 'docker' is not available: this Environment Service "
                "was started without a Docker endpoint (docker_host)"
            )
        self.docker_host = host
        self.config = own
        hardening.check_user(own.user)
        self._engine: DockerEngine | None = None

    @property
    def engine(self) -> DockerEngine:
        """The daemon connection every sandbox shares (made on first use)."""
        if self._engine is None:
            self._engine = DockerEngine(self.docker_host)
        return self._engine

    @classmethod
    def placement(cls, image: str, runtime: str) -> tuple[str, str]:
        if not image or image == "host":
            raise InvalidRequestError("the docker backend needs an image name (not 'host')")
        if runtime not in ("", *RUNTIMES):
            raise InvalidRequestError(
                f"unknown docker runtime {runtime!r}; expected 'runc' or 'runsc'"
            )
        return image, runtime or "runc"

    async def build(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        own = self.config
        quota = hardening.DiskQuota(
            workspace_mib=spec.disk_mib or own.workspace_mib,
            workspace_inodes=own.inodes,
            tmp_mib=own.tmp_mib,
            tmp_inodes=own.inodes,
        )
        return DockerSandbox(
            sandbox_id,
            engine=self.engine,
            image=spec.image,
            runtime=spec.runtime or "runc",
            memory_mib=spec.memory_mib,
            pids=spec.pids,
            output_bytes=spec.output_bytes,
            quota=quota,
            user=own.user,
            cpu_shares=spec.cpu_shares or DEFAULT_CPU_SHARES,
        )

    def released(self, sandbox: Sandbox) -> None:
        pass

    async def reclaim(self) -> int:
        try:
            return await self.engine.call(
                "reclaim", lambda api: int(reclaim_orphan_containers(api))
            )
        except SandboxError as exc:  # creates will then fail clearly
            log.warning("cannot reclaim orphan containers at %s: %s", self.docker_host, exc)
            return 0

    async def aclose(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
