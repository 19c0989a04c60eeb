"""Workspace disk quota: the sandbox's workspace folder as a size-limited tmpfs.

``mount_workspace(folder, mib)`` mounts a fresh tmpfs of ``mib`` MiB (``nosuid``,
``nodev``) on the host folder that becomes ``/workspace``, so the host, the
sandbox's file operations and its snapshots all see the same files. A command that
writes past the size gets ``ENOSPC`` ("No space left on device"); the host's disks
are untouched. Pages of a tmpfs are memory: they count against the memory cgroup of
the process that wrote them (the sandbox), so a workspace can hold at most the
sandbox's memory limit whatever its quota.

The mount lives in the host's mount namespace: :meth:`LocalSandbox.stop` and
:func:`~megaflow.env.local.reclaim_orphans` unmount it (lazily, so a busy mount
cannot block cleanup).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

from megaflow.core.errors import SandboxError

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MNT_DETACH = 0x2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_workspace(folder: Path, size_mib: int) -> None:
    """Mount a ``size_mib`` MiB tmpfs on the (empty) ``folder``; SandboxError if it fails."""
    options = f"size={size_mib}m,mode=0755".encode()
    rc = _libc().mount(
        b"megaflow-workspace",
        os.fsencode(folder),
        b"tmpfs",
        ctypes.c_ulong(_MS_NOSUID | _MS_NODEV),
        options,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"cannot mount the workspace quota on {folder}: {os.strerror(err)}")


def unmount_workspace(folder: Path) -> None:
    """Detach every mount stacked on ``folder`` (no-op when it is not a mount point)."""
    for _ in range(8):
        try:
            if not os.path.ismount(folder):
                return
        except OSError:
            return
        if _libc().umount2(os.fsencode(folder), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise SandboxError(f"cannot unmount {folder}: {os.strerror(err)}")
