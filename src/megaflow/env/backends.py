"""Sandbox backends as the Environment Service uses them: one factory over the
registered backends (`megaflow.env.registry`), and the operations the service needs.

`SandboxFactory.spec` turns a request's image, placement and limits into a `SandboxSpec`
(also the key of a persistent pool), asking the named backend (``placement.backend``,
else the service's ``default_backend``) to check the image and runtime;
`SandboxFactory.build` makes an unstarted sandbox with that backend. Any registered
backend serves: ``local`` (bubblewrap), ``docker``, or a plug-in.

Optional operations (suspend, snapshot, recreate) are called only where the sandbox's
`~megaflow.env.sandbox.Capabilities` declare them; otherwise they say so
(InvalidRequestError), or fall back (a reset without ``recreate`` restarts the shell and
restores the workdir).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import cast

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.core.registry import parse_config
from megaflow.env.config import EnvServiceConfig
from megaflow.env.registry import SandboxBackend, SandboxSpec, backend_class
from megaflow.env.sandbox import (
    HostSocketSandbox,
    RecreatableSandbox,
    Sandbox,
    SnapshotSandbox,
    SuspendableSandbox,
)
from megaflow.env.shell import SHELL_RESTARTED
from megaflow.v1 import common_pb2

__all__ = ["MODES", "SandboxFactory", "SandboxSpec"]

log = logging.getLogger(__name__)

MODES = ("ephemeral", "persistent")


class SandboxFactory:
    """Builds sandboxes with the registered backends, one instance of each per service."""

    def __init__(self, config: EnvServiceConfig) -> None:
        self.config = config
        self._backends: dict[str, SandboxBackend] = {}
        self._reclaimed: dict[str, asyncio.Task[int]] = {}
        self._built: dict[str, tuple[str, Sandbox]] = {}  # id -> (its backend, the sandbox)

    def backend(self, name: str) -> SandboxBackend:
        """The service's instance of backend ``name`` (made on first use);
        InvalidRequestError if it is unknown or not available here."""
        made = self._backends.get(name)
        if made is None:
            cls = backend_class(name)
            settings = self.config.backends.get(name)
            made = cls(self.config, parse_config(cls.config_class, settings, f"{name} backend"))
            self._backends[name] = made
        return made

    def configured(self) -> list[str]:
        """Backends this service offers from the start: ``local``, the default one, those
        with settings, and ``docker`` where a Docker endpoint is set."""
        names = ["local", self.config.default_backend, *self.config.backends]
        if self.config.docker_host is not None:
            names.append("docker")
        return list(dict.fromkeys(names))

    async def aclose(self) -> None:
        """Close every backend (connections, image caches)."""
        backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            await backend.aclose()

    def released(self, sandbox: Sandbox) -> None:
        """A sandbox is gone: its backend frees what it held (e.g. unpins its image)."""
        name, _ = self._built.pop(sandbox.sandbox_id, (None, None))
        backend = None if name is None else self._backends.get(name)
        if backend is not None:
            backend.released(sandbox)

    def unreleased(self) -> list[Sandbox]:
        """Sandboxes built and not `released` yet (at shutdown, once every holder gave
        its own back: leaked ones)."""
        return [sandbox for _, sandbox in self._built.values()]

    def spec(
        self,
        image: str,
        placement: common_pb2.EnvPlacement | None = None,
        limits: common_pb2.EnvLimits | None = None,
    ) -> SandboxSpec:
        """Validate a request's image, placement and limits; InvalidRequestError if bad."""
        cfg = self.config
        name = (placement.backend if placement else "") or cfg.default_backend
        backend = self.backend(name)
        image, runtime = backend.placement(image, placement.runtime if placement else "")
        lim = limits or common_pb2.EnvLimits()
        return SandboxSpec(
            backend=name,
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
        A backend's first sandbox waits for it to reclaim what an earlier process left."""
        backend = self.backend(spec.backend)
        await self._reclaim(spec.backend)
        try:
            sandbox = await backend.build(sandbox_id, spec)
        except TypeError as exc:  # a limit this backend cannot enforce
            raise InvalidRequestError(
                f"the {spec.backend} backend does not support these limits: {exc}"
            ) from exc
        self._built[sandbox_id] = (spec.backend, sandbox)
        return sandbox

    async def reclaim(self) -> int:
        """Remove what a dead earlier process left behind, for every `configured` backend;
        returns how many sandboxes."""
        counts = [await self._reclaim(name) for name in self.configured()]
        return sum(counts)

    async def _reclaim(self, name: str) -> int:
        """Reclaim once per backend and service (concurrent first builds share it)."""
        task = self._reclaimed.get(name)
        if task is None:
            task = asyncio.ensure_future(self._reclaim_quietly(name, self.backend(name)))
            self._reclaimed[name] = task
        return await asyncio.shield(task)

    @staticmethod
    async def _reclaim_quietly(name: str, backend: SandboxBackend) -> int:
        try:
            return await backend.reclaim()
        except Exception as exc:  # the backend still serves; say why nothing was reclaimed
            log.warning("the %s backend could not reclaim orphans: %s", name, exc)
            return 0


# -- operations, by declared capability ------------------------------------------------


def workdir(sandbox: Sandbox) -> str:
    """The agent's working directory inside the sandbox."""
    return sandbox.workdir


def host_socket_dir(sandbox: Sandbox) -> str:
    """The host folder bound at /run/megaflow inside the sandbox; "" where the backend
    does not declare ``host_sockets``."""
    if not sandbox.capabilities.host_sockets:
        return ""
    return str(cast(HostSocketSandbox, sandbox).host_socket_dir)


def _unsupported(sandbox: Sandbox, what: str) -> InvalidRequestError:
    kind = type(sandbox).__name__
    return InvalidRequestError(f"{what} is not supported by this sandbox backend ({kind})")


async def put_files(sandbox: Sandbox, files: Mapping[str, bytes]) -> None:
    """Write a task's repository into the sandbox's workdir."""
    if files:
        await sandbox.put_files(files)


async def snapshot(sandbox: Sandbox) -> bytes:
    """A tar archive of the workdir."""
    if not sandbox.capabilities.snapshot:
        raise _unsupported(sandbox, "snapshot")
    return await cast(SnapshotSandbox, sandbox).snapshot()


async def restore(sandbox: Sandbox, archive: bytes) -> None:
    """Replace the workdir's content with a `snapshot` archive."""
    if not sandbox.capabilities.snapshot:
        raise _unsupported(sandbox, "restore")
    await cast(SnapshotSandbox, sandbox).restore(archive)


async def suspend(sandbox: Sandbox) -> None:
    if not sandbox.capabilities.suspend:
        raise _unsupported(sandbox, "suspend")
    await cast(SuspendableSandbox, sandbox).suspend()


async def resume(sandbox: Sandbox) -> None:
    if sandbox.capabilities.suspend:
        await cast(SuspendableSandbox, sandbox).resume()


async def reset(sandbox: Sandbox, timeout_s: float, pristine: bytes | None = None) -> None:
    """Back to the image state: every process killed (a fresh shell: no background job,
    no variable, no cwd survives), then the workdir restored to ``pristine`` (its
    snapshot right after start), or emptied. SandboxError if it fails.

    Both ways cost about the same on a local sandbox (10-25 ms, mostly the new shell;
    bench/env_bench.py measures them); restoring also keeps what an image ships in its
    workdir, so it is preferred where a pristine snapshot exists."""
    if sandbox.capabilities.recreate:  # docker: a new container; its writable layer goes too
        async with asyncio.timeout(timeout_s):
            await cast(RecreatableSandbox, sandbox).recreate(timeout_s)
        if not sandbox.alive:
            raise SandboxError(f"sandbox {sandbox.sandbox_id} died during its reset")
        return
    async with asyncio.timeout(timeout_s):
        await sandbox.execute("exit 0", timeout_s)  # the sandbox starts a new shell
        if pristine is not None and sandbox.capabilities.snapshot:
            await restore(sandbox, pristine)
            if sandbox.alive:
                return
            raise SandboxError(f"sandbox {sandbox.sandbox_id} died during its reset")
        # POSIX sh and busybox alike (busybox find has no -delete); dotfiles too.
        wipe = f"cd {sandbox.workdir} && rm -rf -- ./* ./.[!.]* ./..?*"
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
