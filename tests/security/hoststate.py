"""Host-side state that no sandbox may change, read directly on the host (not through
the service): planted secrets, mounts, sysctls, the hostname, files an attack might
have created, processes and kernel keys carrying a test's unique marker."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

WATCHED_MOUNTPOINTS = frozenset(
    {
        "/",
        "/etc",
        "/usr",
        "/opt",
        "/tmp",
        "/root",
        "/work",
        "/proc",
        "/proc/sys",
        "/sys",
        "/sys/fs/cgroup",
        "/dev",
        "/dev/shm",
        "/mnt",
        "/home",
        "/var",
        "/workspace",
    }
)
"""Host mount points an attack might mount over or remount (other mounts on this shared
machine come and go with colleagues' tests, so only these are compared)."""

WATCHED_SYSCTLS = (
    "kernel/hostname",
    "kernel/domainname",
    "kernel/core_pattern",
    "kernel/pid_max",
    "kernel/modprobe",
    "vm/overcommit_memory",
)

PLANT_DIRS = (
    "/",
    "/etc",
    "/usr",
    "/usr/bin",
    "/usr/local/bin",
    "/opt",
    "/bin",
    "/lib",
    "/root",
    "/work",
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/home",
    "/mnt",
)
"""Host folders where a file named after the test's marker must never appear."""

DOCKER_SANDBOX_LABEL = "megaflow.sandbox_id"
"""The label `megaflow.env.docker` puts on every sandbox container."""

X86_64 = platform.machine() == "x86_64"
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
KEYCTL_UNLINK, KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING = 9, -4, -3


def watched_mounts() -> list[str]:
    """Lines of the host's /proc/self/mounts whose mount point is watched."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return sorted(line for line in lines if line.split()[1] in WATCHED_MOUNTPOINTS)


def mounts_under(folder: Path) -> list[str]:
    """Host mounts at or below ``folder`` (sandbox workspaces, leaked mounts)."""
    prefix = str(folder)
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line for line in lines if line.split()[1].startswith(prefix)]


def sysctls() -> dict[str, str]:
    values = {}
    for name in WATCHED_SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = Path("/proc/sys", name).read_text()
    return values


def host_pids_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (this process excluded)."""
    found = []
    needle = marker.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path("/proc", name, "cmdline").read_bytes():
                found.append(int(name))
    return found


def cgroup_pids(container_id: str) -> list[int]:
    """Host pids in a cgroup named after ``container_id`` (a Docker container's processes,
    whatever their command line)."""
    found = []
    needle = container_id.encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path("/proc", name, "cgroup").read_bytes():
                    found.append(int(name))
    return found


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` (tells a reused pid apart), None when gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def keys_with(marker: str) -> list[int]:
    """Ids of kernel keys (as /proc/keys shows them to this process) named with ``marker``."""
    with contextlib.suppress(OSError):
        text = Path("/proc/keys").read_text()
        return [int(line.split()[0], 16) for line in text.splitlines() if marker in line]
    return []


def unlink_keys(marker: str) -> None:
    """Remove keys named with ``marker`` from this process's user and session keyrings."""
    if not X86_64:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for key in keys_with(marker):
        for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING):
            libc.syscall(SYS_KEYCTL, KEYCTL_UNLINK, key, ring)


def planted_paths(marker: str, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    """Host paths whose name contains ``marker`` in a plant folder (or below ``extra_dirs``)."""
    found = []
    for folder in PLANT_DIRS:
        with contextlib.suppress(OSError):
            found += [f"{folder.rstrip('/')}/{n}" for n in os.listdir(folder) if marker in n]
    for extra in extra_dirs:
        found += [str(p) for p in extra.rglob(f"*{marker}*")]
    return found


@dataclass
class HostSnapshot:
    """What the host looked like before an attack; `assert_unchanged` compares."""

    marker: str
    secrets: dict[Path, bytes]
    mounts: list[str]
    sysctl_values: dict[str, str]
    hostname: str
    extra_dirs: tuple[Path, ...]

    @classmethod
    def take(
        cls, marker: str, secrets: dict[Path, bytes], extra_dirs: tuple[Path, ...]
    ) -> HostSnapshot:
        return cls(marker, secrets, watched_mounts(), sysctls(), socket.gethostname(), extra_dirs)

    def assert_unchanged(self) -> None:
        for path, content in self.secrets.items():
            assert path.read_bytes() == content, f"host secret {path} was changed"
        assert watched_mounts() == self.mounts, "a watched host mount changed"
        assert sysctls() == self.sysctl_values, "a host sysctl changed"
        assert socket.gethostname() == self.hostname, "the host's hostname changed"
        assert Path("/proc/sys/kernel/hostname").read_text().strip() == self.hostname
        assert not planted_paths(self.marker, self.extra_dirs), "a file appeared on the host"
        assert not keys_with(self.marker), "a kernel key appeared in the host's keyrings"
