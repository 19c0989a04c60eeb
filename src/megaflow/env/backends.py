"""Sandbox backends: which class builds a sandbox, and the operations the service needs.

`SandboxFactory.spec` turns a request's image, placement and limits into a `SandboxSpec`
(also the key of a persistent pool); `SandboxFactory.build` makes an unstarted sandbox.
``local`` is bubblewrap (`megaflow.env.local`); ``docker`` (`megaflow.env.docker`) is
imported only when asked for, and only when the service has a Docker endpoint.

Every backend implements the `Sandbox` protocol. Where an older sandbox lacks an
optional operation, `_optional` (the one place that checks) finds out and the
functions here fall back on the host side (a local sandbox's `host_workspace`).
"""

from __future__ import annotations

import asyncio
import importlib
import io
import logging
import shutil
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.config import EnvServiceConfig
from megaflow.env.images import Image, ImageStore, ImageStoreConfig
from megaflow.env.local import LocalSandbox, reclaim_orphans
from megaflow.env.local.sandbox import SHELL_RESTARTED
from megaflow.env.sandbox import Sandbox
from megaflow.v1 import common_pb2

log = logging.getLogger(__name__)

BACKENDS = ("local", "docker")
MODES = ("ephemeral", "persistent")
LOCAL_IMAGES = ("", "host")
# Image references the local backend provisions through `megaflow.env.images.ImageStore`.
LOCAL_IMAGE_SOURCES = ("dir:", "tar:", "registry:", "oci:")


@dataclass(frozen=True)
class SandboxSpec:
    """What a sandbox is made of; equal specs are interchangeable (one pool per spec)."""

    backend: str
    image: str
    runtime: str
    memory_mib: int
    pids: int
    output_bytes: int
    cpu_shares: int
    disk_mib: int


class SandboxFactory:
    """Builds sandboxes of each backend from the service's settings."""

    def __init__(self, config: EnvServiceConfig) -> None:
        self.config = config
        self._docker_engine: Any = None  # megaflow.env.docker.DockerEngine, made on first use
        self._images: ImageStore | None = None  # made on the first image other than "host"
        self._pinned: dict[str, Image] = {}  # sandbox id -> the image it runs on

    def _docker(self) -> tuple[Any, Any]:
        """The `megaflow.env.docker` module and the service's shared engine."""
        assert self.config.docker_host is not None
        module = importlib.import_module("megaflow.env.docker")
        if self._docker_engine is None:
            self._docker_engine = module.DockerEngine(self.config.docker_host)
        return module, self._docker_engine

    def close(self) -> None:
        """Close the Docker connection, if one was opened."""
        if self._docker_engine is not None:
            self._docker_engine.close()
            self._docker_engine = None

    async def aclose(self) -> None:
        """Close everything, the image store included."""
        self.close()
        if self._images is not None:
            await self._images.close()
            self._images = None

    def _image_store(self) -> ImageStore:
        if self._images is None:
            self._images = ImageStore(
                ImageStoreConfig(
                    cache_dir=self.config.image_cache_dir,
                    max_bytes=self.config.image_cache_mib * 1024 * 1024,
                )
            )
        return self._images

    def released(self, sandbox: Sandbox) -> None:
        """A sandbox is gone: unpin its image (the cache may now evict it)."""
        image = self._pinned.pop(sandbox.sandbox_id, None)
        if image is not None and self._images is not None:
            self._images.release(image)

    def spec(
        self,
        image: str,
        placement: common_pb2.EnvPlacement | None = None,
        limits: common_pb2.EnvLimits | None = None,
    ) -> SandboxSpec:
        """Validate a request's image, placement and limits; InvalidRequestError if bad."""
        cfg = self.config
        backend = (placement.backend if placement else "") or cfg.default_backend
        runtime = placement.runtime if placement else ""
        if backend not in BACKENDS:
            raise InvalidRequestError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend == "local":
            if image in LOCAL_IMAGES:
                image = "host"
            elif not image.startswith(LOCAL_IMAGE_SOURCES):
                raise InvalidRequestError(
                    f"image {image!r} is not available to the local backend: use 'host' or a "
                    f"reference starting with one of {LOCAL_IMAGE_SOURCES}"
                )
            if runtime:
                raise InvalidRequestError("placement.runtime applies to the docker backend only")
        else:
            if cfg.docker_host is None:
                raise InvalidRequestError(
                    "placement.backend 'docker' is not available: this Environment Service "
                    "was started without a Docker endpoint (docker_host)"
                )
            if not image or image == "host":
                raise InvalidRequestError("the docker backend needs an image name")
            if runtime not in ("", "runc", "runsc"):
                raise InvalidRequestError(f"unknown docker runtime {runtime!r}")
        lim = limits or common_pb2.EnvLimits()
        return SandboxSpec(
            backend=backend,
            image=image,
            runtime=runtime,
            memory_mib=lim.memory_mib or cfg.memory_mib,
            pids=lim.pids or cfg.pids,
            output_bytes=lim.output_bytes or cfg.output_bytes,
            cpu_shares=lim.cpu_shares,
            disk_mib=lim.disk_mib,
        )

    async def build(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        """An unstarted sandbox of ``spec``; InvalidRequestError if the backend refuses it.

        A local image other than "host" is provisioned on demand (pulled once, cached by
        digest) and pinned until `released` is called for the sandbox."""
        extra: dict[str, Any] = {}
        if spec.cpu_shares:
            extra["cpu_shares"] = spec.cpu_shares
        if spec.disk_mib:
            extra["disk_mib"] = spec.disk_mib
        common: dict[str, Any] = dict(
            memory_mib=spec.memory_mib, pids=spec.pids, output_bytes=spec.output_bytes, **extra
        )
        try:
            if spec.backend == "local":
                if spec.image == "host":
                    return cast(
                        Sandbox, LocalSandbox(sandbox_id, root_dir=self.config.root_dir, **common)
                    )
                image = await self._image_store().acquire(spec.image)
                try:
                    sandbox = LocalSandbox(
                        sandbox_id, root_dir=self.config.root_dir, image_root=image.rootfs, **common
                    )
                except BaseException:
                    self._image_store().release(image)
                    raise
                self._pinned[sandbox_id] = image
                return cast(Sandbox, sandbox)
            docker, engine = self._docker()
            return cast(
                Sandbox,
                docker.DockerSandbox(
                    sandbox_id,
                    engine=engine,
                    image=spec.image,
                    runtime=spec.runtime or "runc",
                    **common,
                ),
            )
        except TypeError as exc:  # a limit this backend cannot enforce (yet)
            raise InvalidRequestError(
                f"the {spec.backend} backend does not support these limits: {exc}"
            ) from exc

    async def reclaim(self) -> int:
        """Remove what a dead earlier process left behind (local folders and cgroups, and
        labelled containers where Docker is configured); returns how many."""
        count = await asyncio.to_thread(reclaim_orphans, self.config.root_dir)
        if self.config.docker_host is not None:
            try:
                docker, engine = self._docker()
                count += await asyncio.to_thread(
                    lambda: int(docker.reclaim_orphan_containers(engine.api))
                )
            except (ImportError, SandboxError) as exc:  # docker creates will fail clearly
                log.warning(
                    "cannot reclaim orphan containers at %s: %s", self.config.docker_host, exc
                )
        return count


# -- operations with host-side fallbacks --------------------------------------------


def _optional(sandbox: Sandbox, name: str) -> Callable[..., Any] | None:
    """The sandbox's method ``name`` if its backend has it (the one capability check)."""
    return cast(Callable[..., Any] | None, getattr(sandbox, name, None))


def workdir(sandbox: Sandbox) -> str:
    """The agent's working directory inside the sandbox."""
    value = getattr(sandbox, "workdir", None) or getattr(sandbox, "WORKDIR", "/workspace")
    return str(value)


def _host_workspace(sandbox: Sandbox, what: str) -> Path:
    workspace = getattr(sandbox, "host_workspace", None)
    if not isinstance(workspace, Path):
        raise InvalidRequestError(f"{what} is not supported by this sandbox backend")
    return workspace


async def put_files(sandbox: Sandbox, files: Mapping[str, bytes]) -> None:
    """Write a task's repository into the sandbox's workdir."""
    if not files:
        return
    put = _optional(sandbox, "put_files")
    if put is not None:
        await put(files)
        return
    await asyncio.to_thread(_write_files, _host_workspace(sandbox, "put_files"), files)


async def snapshot(sandbox: Sandbox) -> bytes:
    """A tar archive of the workdir."""
    take = _optional(sandbox, "snapshot")
    if take is not None:
        return cast(bytes, await take())
    return await asyncio.to_thread(_tar_dir, _host_workspace(sandbox, "snapshot"))


async def restore(sandbox: Sandbox, archive: bytes) -> None:
    """Replace the workdir's content with a `snapshot` archive."""
    put_back = _optional(sandbox, "restore")
    if put_back is not None:
        await put_back(archive)
        return
    await asyncio.to_thread(_untar_into, _host_workspace(sandbox, "restore"), archive)


async def suspend(sandbox: Sandbox) -> None:
    freeze = _optional(sandbox, "suspend")
    if freeze is None:
        raise InvalidRequestError("suspend is not supported by this sandbox backend")
    await freeze()


async def resume(sandbox: Sandbox) -> None:
    thaw = _optional(sandbox, "resume")
    if thaw is not None:
        await thaw()


async def reset(sandbox: Sandbox, timeout_s: float, pristine: bytes | None = None) -> None:
    """Back to the image state: every process killed (a fresh shell: no background job,
    no variable, no cwd survives), then the workdir restored to ``pristine`` (its
    snapshot right after start), or emptied. SandboxError if it fails.

    Both ways cost about the same on a local sandbox (10-25 ms, mostly the new shell;
    bench/env_bench.py measures them); restoring also keeps what an image ships in its
    workdir, so it is preferred where a pristine snapshot exists."""
    recreate = _optional(sandbox, "recreate")
    if recreate is not None:  # docker: a new container; its writable layer goes too
        async with asyncio.timeout(timeout_s):
            await recreate(timeout_s)
        if not sandbox.alive:
            raise SandboxError(f"sandbox {sandbox.sandbox_id} died during its reset")
        return
    async with asyncio.timeout(timeout_s):
        await sandbox.execute("exit 0", timeout_s)  # the sandbox starts a new shell
        if pristine is not None:
            await restore(sandbox, pristine)
            if sandbox.alive:
                return
            raise SandboxError(f"sandbox {sandbox.sandbox_id} died during its reset")
        # POSIX sh and busybox alike (busybox find has no -delete); dotfiles too.
        wipe = f"cd {workdir(sandbox)} && rm -rf -- ./* ./.[!.]* ./..?*"
        result = await sandbox.execute(wipe, timeout_s)
    if result.exit_code != 0 or not sandbox.alive:
        raise SandboxError(f"sandbox {sandbox.sandbox_id}: reset failed: {result.output[-500:]}")


async def probe(sandbox: Sandbox, timeout_s: float) -> bool:
    """Liveness: the sandbox is up and its shell answers `true`, empty, in time."""
    if not sandbox.alive:
        return False
    try:
        result = await sandbox.execute("true", timeout_s)
    except Exception:
        return False
    return result.exit_code == 0 and not result.timed_out and result.output == ""


def shell_died_between_calls(output: str) -> bool:
    """Whether a step's output says its shell had died *before* the step ran (killed from
    outside, or by the kernel): the task's shell state is gone, an infrastructure fault.
    A shell that exits under a command (`exit`) reports it at the end instead."""
    return output.startswith(SHELL_RESTARTED)


def _write_files(workspace: Path, files: Mapping[str, bytes]) -> None:
    for rel, content in files.items():
        target = workspace / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def _tar_dir(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    return buffer.getvalue()


def _untar_into(root: Path, archive: bytes) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidRequestError(f"the snapshot cannot be restored: {exc}") from exc
