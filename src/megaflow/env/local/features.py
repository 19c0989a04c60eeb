"""Sandbox features beyond the shell: suspend/resume, uploads, snapshots, restores.

A mixin of :class:`~megaflow.env.local.LocalSandbox`: the attributes declared below
are the sandbox's own. Suspending goes through the cgroup freezer (v1
``freezer.state``, v2 ``cgroup.freeze``); uploads, snapshots and restores work on the
host folder behind ``/workspace`` (see :mod:`megaflow.env.local.workspace`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.local import workspace
from megaflow.env.local.bwrap import WORKDIR
from megaflow.env.local.cgroups import SandboxCgroups
from megaflow.env.local.freezer import FREEZE_TIMEOUT_S, freeze_settled, request_freeze


class SandboxFeatures:
    """Suspend/resume, put_files, snapshot and restore for a local sandbox."""

    sandbox_id: str
    host_workspace: Path
    _lock: asyncio.Lock
    _state: Literal["new", "starting", "running", "stopped"]
    _cgroups: SandboxCgroups
    _frozen: bool
    uid: int

    @property
    def workdir(self) -> str:
        """The agent's working folder inside the sandbox: ``/workspace``."""
        return WORKDIR

    @property
    def suspended(self) -> bool:
        """Whether the sandbox's processes are frozen (see :meth:`suspend`)."""
        return self._frozen

    @property
    def can_suspend(self) -> bool:
        """Whether :meth:`suspend` really freezes (the machine has a cgroup freezer)."""
        return self._cgroups.freezer_file is not None

    # -- suspend, snapshot, restore --------------------------------------------------

    async def suspend(self) -> None:
        """Freeze every process of the sandbox (no CPU used, memory kept).

        Waits for a running command to end first. The next :meth:`execute` (or file
        operation) resumes automatically. A no-op where the machine has no freezer
        (:attr:`can_suspend` is False). SandboxError if the sandbox is not running.
        """
        async with self._lock:
            if self._state != "running":
                raise SandboxError(f"sandbox {self.sandbox_id} is not running ({self._state})")
            if not self._frozen:
                await self._set_frozen(True)

    async def resume(self) -> None:
        """Thaw a suspended sandbox; a no-op when it is not suspended."""
        async with self._lock:
            if self._state != "running":
                raise SandboxError(f"sandbox {self.sandbox_id} is not running ({self._state})")
            await self._set_frozen(False)

    async def put_files(self, files: Mapping[str, bytes]) -> None:
        """Write files (paths relative to /workspace) from the host, creating folders.

        Meant for a fresh workspace; still, no path may be absolute or contain ``..``,
        and a symlink on the way is refused (nothing is written outside the workspace).
        InvalidRequestError on a bad path or when the workspace quota is full.
        """
        for path, data in files.items():
            workspace.check_relative(path)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidRequestError(f"put_files {path!r}: content must be bytes")
        async with self._lock:
            self._check_running()
            await asyncio.to_thread(workspace.write_files, self.host_workspace, files, self.uid)

    async def snapshot(self) -> bytes:
        """An uncompressed tar archive of /workspace (paths relative to it).

        The sandbox is frozen while the archive is made (so background writers cannot
        tear it), then returned to the state it was in, whatever happens meanwhile: a
        freeze asked for is undone even if the caller is cancelled or the freeze does not
        settle (a sandbox left frozen could not be killed, not even by its own bwrap's
        ``--die-with-parent`` once this process is gone).
        """
        async with self._lock:
            self._check_running()
            freeze = self.can_suspend and not self._frozen
            try:
                if freeze:
                    await self._set_frozen(True)
                return await asyncio.to_thread(workspace.pack, self.host_workspace)
            finally:
                if freeze:
                    await self._set_frozen(False)

    async def restore(self, archive: bytes) -> None:
        """Replace /workspace's content with a :meth:`snapshot` archive (any tar works).

        The archive is checked before anything changes: absolute member paths are made
        relative, and ``..`` paths, links leaving the workspace, members written through
        a symlink and device files make it an InvalidRequestError. The shell and its
        working folder are kept.
        """
        if not isinstance(archive, (bytes, bytearray, memoryview)):
            raise InvalidRequestError("restore archive must be bytes")
        async with self._lock:
            self._check_running()
            await asyncio.to_thread(workspace.unpack, self.host_workspace, bytes(archive), self.uid)

    def _check_running(self) -> None:
        if self._state != "running":
            raise SandboxError(f"sandbox {self.sandbox_id} is not running ({self._state})")

    async def _set_frozen(self, frozen: bool) -> None:
        """Freeze or thaw through the cgroup freezer and wait until it has settled."""
        control = self._cgroups.freezer_file
        if control is None:
            self._frozen = False
            return
        request_freeze(control, frozen)
        self._frozen = frozen
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FREEZE_TIMEOUT_S
        while not freeze_settled(control, frozen):
            if loop.time() > deadline:
                state = "frozen" if frozen else "thawed"
                raise SandboxError(f"sandbox {self.sandbox_id} was not {state} in time")
            await asyncio.sleep(0.0005)
