"""Disk quotas of a local sandbox, on by default: its folders live on size- and
inode-limited tmpfs mounts.

Each sandbox folder ``root_dir/<id>/`` is itself a tmpfs (``nosuid``, ``nodev``):
``workspace/`` (``/workspace`` inside), the inbox, the socket folder and the writable
folders share its size and inode limits; ``root_dir/<id>/tmp`` is a second, smaller
tmpfs bound as ``/tmp``. A write past either gives ``ENOSPC`` ("No space left on
device"), and creating files past the inode limit too; the host's disks and the other
sandboxes are untouched.

Defaults (:func:`default_disk_mib`, :func:`default_tmp_mib`, :func:`inodes_for`): the
workspace gets half the sandbox's memory limit, ``/tmp`` a quarter, and each
:data:`INODES_PER_MIB` inodes per MiB (at least :data:`MIN_INODES`). A task's
``disk_mib`` (or the local backend's ``disk_mib``/``tmp_mib`` settings) changes them;
there is no "unlimited". Pages of a tmpfs are memory: they count against the memory
cgroup of the process that wrote them (the sandbox), which is why the defaults stay
below the memory limit: a workload filling both gets ``ENOSPC``, not the OOM killer.
A ``disk_mib`` larger than the memory limit holds at most what the memory allows.

The mounts live in the host's mount namespace: :meth:`LocalSandbox.stop` and
:func:`~megaflow.env.local.reclaim_orphans` unmount them (lazily, so a busy mount
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

INODES_PER_MIB = 256
"""Inodes a quota'd tmpfs gets per MiB of its size (files and folders count)."""
MIN_INODES = 4096
MIN_DISK_MIB = 8


def default_disk_mib(memory_mib: int) -> int:
    """The workspace quota when none is asked: half the memory limit."""
    return max(MIN_DISK_MIB, memory_mib // 2)


def default_tmp_mib(memory_mib: int) -> int:
    """The ``/tmp`` quota when none is set: a quarter of the memory limit."""
    return max(MIN_DISK_MIB, memory_mib // 4)


def inodes_for(size_mib: int) -> int:
    """The inode limit of a tmpfs of ``size_mib`` MiB."""
    return max(MIN_INODES, size_mib * INODES_PER_MIB)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_quota(
    folder: Path,
    size_mib: int,
    *,
    inodes: int | None = None,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    name: str = "megaflow-workspace",
) -> None:
    """Mount a ``size_mib`` MiB tmpfs with ``inodes`` inodes (default
    :func:`inodes_for`) on the (empty) ``folder``, its root owned by ``uid``:``gid``
    with ``mode``; SandboxError if it fails."""
    nr_inodes = inodes if inodes is not None else inodes_for(size_mib)
    options = f"size={size_mib}m,nr_inodes={nr_inodes},mode={mode:o},uid={uid},gid={gid}"
    rc = _libc().mount(
        name.encode(),
        os.fsencode(folder),
        b"tmpfs",
        ctypes.c_ulong(_MS_NOSUID | _MS_NODEV),
        options.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"cannot mount the disk quota on {folder}: {os.strerror(err)}")


def mount_workspace(folder: Path, size_mib: int) -> None:
    """Mount a ``size_mib`` MiB tmpfs on the (empty) ``folder``; SandboxError if it fails."""
    mount_quota(folder, size_mib)


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


def unmount_sandbox(folder: Path) -> None:
    """Detach a sandbox folder's quota mounts: its ``tmp``, an older layout's
    ``workspace``, then the folder itself."""
    for path in (folder / "tmp", folder / "workspace", folder):
        unmount_workspace(path)
