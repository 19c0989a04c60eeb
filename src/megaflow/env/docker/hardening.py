"""Least privilege and disk quotas of Docker (runc and gVisor) sandboxes.

What every hardened container gets (see docs/sandboxes.md, "Docker hardening"):

- capabilities: all dropped (``cap_drop=ALL``), then only :data:`CAPABILITIES` added
  back. They matter only to a workload running as root (gVisor, or a userns-remapped
  daemon): a non-root workload has an empty effective set whatever the bounding set.
- ``no-new-privileges``: a setuid binary does not raise privileges.
- seccomp: :func:`seccomp_profile` (``seccomp.json`` beside this module), an
  allowlist no wider than Docker's default for a container without ``CAP_SYS_ADMIN``,
  less ``io_uring``, with the local backend's denials spelled out: kernel keyrings
  (``add_key``, ``request_key``, ``keyctl``) and ``unshare``/``setns``/``mount`` ->
  EPERM, ``clone`` with any namespace flag -> EPERM, ``clone3`` -> ENOSYS.
- a non-root user (:data:`DEFAULT_USER`); ``root`` only where the runtime isolates it.
- ``/workspace`` and ``/tmp`` are tmpfs mounts with a size and an inode limit
  (:class:`DiskQuota`, on by default): a write past them gets ``ENOSPC``. tmpfs is
  memory: its pages count to the container's memory cgroup, so the container's limit
  is the workload's memory plus both quota sizes. Under gVisor (this runsc) the tmpfs
  is the Sentry's own memory, and ``nr_inodes`` is not enforced by it: files are
  bounded by the size (each inode costs memory of the sandbox) and the memory limit.
- ``/proc/keys``, ``/proc/timer_list`` and the rest of Docker's masked paths stay
  masked; no bind mount of a host folder, no Docker socket, ``--network none``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import docker  # type: ignore[import-untyped]

from megaflow.core.errors import InvalidRequestError

CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID")
"""Capabilities a hardened sandbox keeps (everything else is dropped).

Why each, for a root workload (package managers, build tools): ``CHOWN``,
``DAC_OVERRIDE``, ``FOWNER``, ``FSETID``: install files owned by other users and keep
their modes (``apt``, ``pip`` as root, ``tar -p``); ``SETUID``, ``SETGID``: drop to
another user (``apt``'s ``_apt`` sandbox, ``su``); ``KILL``: signal one's own
processes running under another uid. Dropped from Docker's default set: ``NET_RAW``,
``NET_BIND_SERVICE`` (no network anyway), ``MKNOD``, ``AUDIT_WRITE``, ``SETFCAP``,
``SETPCAP``, ``SYS_CHROOT``."""

DEFAULT_USER = "1000:1000"
"""The workload's ``uid:gid`` unless the service config asks for another."""

PROFILES = ("hardened", "docker-default")
"""``docker-default``: Docker's own defaults (+ no-new-privileges, as before), for the
benchmark that measures what hardening costs; never offered to tasks."""

DEFAULT_WORKSPACE_MIB = 1024
DEFAULT_TMP_MIB = 256
DEFAULT_INODES = 65_536
"""Default quotas of ``/workspace`` (size), ``/tmp`` (size) and each one's inodes."""

RUNSC_MIN_MEMORY_MIB = 32
"""Smallest workload memory limit accepted under gVisor: a margin for the Sentry's own
memory, which the container's cgroup also holds (busybox boots at 16 MiB here; a real
workload killed with its Sentry loses the whole sandbox, not one process)."""

_USER = re.compile(r"(?:root|\d{1,9})(?::\d{1,9})?")


@dataclass(frozen=True)
class DiskQuota:
    """Size (MiB) and inode limits of a sandbox's ``/workspace`` and ``/tmp``."""

    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    workspace_inodes: int = DEFAULT_INODES
    tmp_mib: int = DEFAULT_TMP_MIB
    tmp_inodes: int = DEFAULT_INODES

    def __post_init__(self) -> None:
        sizes = (self.workspace_mib, self.tmp_mib)
        inodes = (self.workspace_inodes, self.tmp_inodes)
        if not all(1 <= s <= 1024 * 1024 for s in sizes) or not all(
            64 <= n <= 1 << 30 for n in inodes
        ):
            raise InvalidRequestError(
                f"disk quota out of range: {self} (sizes 1..1048576 MiB, inodes 64..2^30; "
                "a quota is never unlimited)"
            )


def check_user(user: str) -> None:
    if not _USER.fullmatch(user):
        raise InvalidRequestError(f"invalid sandbox user {user!r}; expected 'uid[:gid]' or 'root'")


def check_runsc_limits(memory_mib: int, quota: DiskQuota) -> None:
    """Refuse limits gVisor cannot boot with (a clear error at create, not a crash)."""
    if memory_mib < RUNSC_MIN_MEMORY_MIB:
        raise InvalidRequestError(
            f"memory_mib={memory_mib} is too small for gVisor (runtime runsc): its Sentry "
            f"needs at least {RUNSC_MIN_MEMORY_MIB} MiB"
        )


@cache
def seccomp_profile() -> str:
    """The seccomp profile (JSON text) every hardened container gets."""
    text = resources.files(__package__).joinpath("seccomp.json").read_text()
    json.loads(text)  # a broken file fails here, not in the daemon
    return text


def tmpfs_options(size_mib: int, inodes: int, mode: str, user: str) -> str:
    """Mount options of a quota tmpfs (exec: scripts and builds run from it)."""
    opts = [f"size={size_mib}m", f"nr_inodes={inodes}", f"mode={mode}", "exec", "nosuid", "nodev"]
    uid, _, gid = user.partition(":")
    if uid not in ("root", "0"):
        opts += [f"uid={uid}", f"gid={gid or uid}"]
    return ",".join(opts)


def host_options(quota: DiskQuota, user: str) -> dict[str, Any]:
    """``create_host_config`` arguments of a hardened container."""
    return {
        "cap_drop": ["ALL"],
        "cap_add": list(CAPABILITIES),
        "security_opt": ["no-new-privileges", f"seccomp={seccomp_profile()}"],
        "tmpfs": {
            "/workspace": tmpfs_options(quota.workspace_mib, quota.workspace_inodes, "0755", user),
            "/tmp": tmpfs_options(quota.tmp_mib, quota.tmp_inodes, "1777", "root"),
        },
    }


def daemon_remaps_users(api: docker.APIClient) -> bool:
    """Whether the daemon runs containers in a user namespace (``userns-remap``)."""
    options = api.info().get("SecurityOptions") or []
    return any("name=userns" in str(o) for o in options)
