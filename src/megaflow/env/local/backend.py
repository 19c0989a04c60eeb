"""The ``local`` sandbox backend: bubblewrap sandboxes on this host (`LocalSandbox`).

Images: ``host`` (the host's own ``/usr``, the default) or a reference the image store
provisions on demand and caches by digest (``dir:``, ``tar:``, ``oci:``, ``docker://``,
``registry:``; see `megaflow.env.images`); each sandbox pins its image until it is
released. Registry pulls follow the service's ``insecure_registries``,
``registry_auth_file`` and ``registry_cert_dir``.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InvalidRequestError
from megaflow.env.config import EnvServiceConfig
from megaflow.env.images import Image, ImageStore, ImageStoreConfig
from megaflow.env.local.owner import reclaim_orphans
from megaflow.env.local.sandbox import SANDBOX_UID, LocalSandbox
from megaflow.env.registry import SandboxSpec
from megaflow.env.sandbox import Capabilities, Sandbox, SnapshotSandbox, SuspendableSandbox

IMAGE_SOURCES = ("dir:", "tar:", "oci:", "docker://", "registry:")
"""Prefixes of the image references the local backend provisions (besides ``host``)."""


class LocalBackendConfig(BaseModel):
    """Settings of the local backend (the service's own settings do the rest: root_dir,
    image cache)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    writable_dirs: tuple[str, ...] = Field(
        default=(),
        description="Absolute folders every sandbox may write besides /workspace and /tmp "
        "(each a private folder of the sandbox; e.g. Harbor's /logs, /tests, /solution).",
    )
    disk_mib: int = Field(
        default=0,
        ge=0,
        le=1024 * 1024,
        description="Workspace quota (MiB) of a sandbox whose task asks none; 0: half its "
        "memory limit. Never unlimited.",
    )
    tmp_mib: int = Field(
        default=0,
        ge=0,
        le=1024 * 1024,
        description="/tmp quota (MiB) of every sandbox; 0: a quarter of its memory limit.",
    )
    sandbox_uid: int = Field(
        default=SANDBOX_UID,
        gt=0,
        lt=2**32 - 1,
        description="Unprivileged host uid (and gid) the sandboxes' workloads run as "
        "(root only inside their user namespace).",
    )


class LocalBackend:
    """Builds `LocalSandbox`es under the service's ``root_dir``."""

    name: ClassVar[str] = "local"
    config_class: ClassVar[type[BaseModel]] = LocalBackendConfig
    capabilities: ClassVar[Capabilities] = LocalSandbox.capabilities

    def __init__(self, service: EnvServiceConfig, config: Any = None) -> None:
        self.service = service
        self.config: LocalBackendConfig = config or LocalBackendConfig()
        self._images: ImageStore | None = None  # made on the first image other than "host"
        self._pinned: dict[str, Image] = {}  # sandbox id -> the image it runs on

    @classmethod
    def placement(cls, image: str, runtime: str) -> tuple[str, str]:
        if runtime:
            raise InvalidRequestError(
                f"the local backend takes no runtime (got {runtime!r}): runtimes are the "
                "docker backend's"
            )
        if image in ("", "host"):
            return "host", ""
        if not image.startswith(IMAGE_SOURCES):
            raise InvalidRequestError(
                f"image {image!r} is not available to the local backend: use 'host' or a "
                f"reference starting with one of {', '.join(IMAGE_SOURCES)}"
            )
        return image, ""

    def image_store(self) -> ImageStore:
        """The image cache (made on first use)."""
        if self._images is None:
            self._images = ImageStore(
                ImageStoreConfig(
                    cache_dir=self.service.image_cache_dir,
                    max_bytes=self.service.image_cache_mib * 1024 * 1024,
                    insecure_registries=self.service.insecure_registries,
                    registry_auth_file=self.service.registry_auth_file,
                    registry_cert_dir=self.service.registry_cert_dir,
                )
            )
        return self._images

    async def build(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        """A local image other than "host" is provisioned on demand (pulled once, cached
        by digest) and pinned until `released` is called for the sandbox."""
        limits: dict[str, Any] = dict(
            memory_mib=spec.memory_mib, pids=spec.pids, output_bytes=spec.output_bytes
        )
        if spec.cpu_shares:
            limits["cpu_shares"] = spec.cpu_shares
        if spec.disk_mib or self.config.disk_mib:
            limits["disk_mib"] = spec.disk_mib or self.config.disk_mib
        if self.config.tmp_mib:
            limits["tmp_mib"] = self.config.tmp_mib
        limits["uid"] = self.config.sandbox_uid
        if self.config.writable_dirs:
            limits["writable_dirs"] = self.config.writable_dirs
        root_dir = self.service.root_dir
        if spec.image == "host":
            return LocalSandbox(sandbox_id, root_dir=root_dir, **limits)
        image = await self.image_store().acquire(spec.image)
        try:
            sandbox = LocalSandbox(sandbox_id, root_dir=root_dir, image_root=image.rootfs, **limits)
        except BaseException:
            self.image_store().release(image)
            raise
        self._pinned[sandbox_id] = image
        return sandbox

    def released(self, sandbox: Sandbox) -> None:
        image = self._pinned.pop(sandbox.sandbox_id, None)
        if image is not None and self._images is not None:
            self._images.release(image)

    async def reclaim(self) -> int:
        return await asyncio.to_thread(reclaim_orphans, self.service.root_dir)

    async def aclose(self) -> None:
        if self._images is not None:
            await self._images.close()
            self._images = None


def _conforms(sandbox: LocalSandbox) -> tuple[SuspendableSandbox, SnapshotSandbox]:
    """Never called: makes mypy check LocalSandbox against the protocols it declares."""
    return sandbox, sandbox
