"""The bubblewrap command line of a local sandbox.

The sandbox sees a read-only root built on a tmpfs: the image's system folders
(``usr``, ``etc``, ``opt``, and the ``bin``/``lib*``/``sbin`` links or folders),
a writable ``/workspace`` (a host folder), a private ``/tmp``, its own ``/proc`` and
a minimal ``/dev``. Nothing else of the host (``/root``, ``/home``, ``/work``,
``/var``, the host's ``/tmp``) exists inside. It runs in new pid, ipc, uts and
network namespaces (only ``lo``, no route out), with every capability dropped,
``/proc/sys`` read-only and a seccomp filter against keyrings and user namespaces
(:mod:`megaflow.env.local.seccomp`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from megaflow.env.local.shell import SAFE_PATH
from megaflow.env.sandbox import SOCKET_DIR

BWRAP = "/usr/bin/bwrap"
WORKDIR = "/workspace"
INBOX = "/.megaflow/inbox"
"""Read-only folder inside the sandbox through which the host hands over uploads."""

IMAGE_ENTRIES = ("usr", "etc", "opt", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""Top-level entries of the image root made visible (read-only) when present."""

MASKED_FILES = ("etc/shadow", "etc/gshadow", "etc/shadow-", "etc/gshadow-")
"""Files of the image hidden behind /dev/null (host password hashes, when image is /)."""

MASKED_PROC = ("/proc/keys", "/proc/key-users", "/proc/timer_list", "/proc/sched_debug")
"""/proc entries describing the host, hidden behind /dev/null (opening it fails: /proc
is nodev)."""

INIT_SCRIPT = "unset SHLVL OLDPWD; bash --noprofile --norc; exit $?"
"""What pid 1 inside runs: the persistent shell as its child (pid 2), then the shell's
status as its own. Bash reaps any orphan meanwhile; its argv names nothing of the host."""


def bwrap_argv(
    *,
    image_root: Path,
    workspace: Path,
    inbox: Path,
    hostname: str,
    sockets: Path | None = None,
    extra_path: Sequence[str] = (),
    seccomp_fd: int | None = None,
    writable_dirs: Sequence[tuple[Path, str]] = (),
    tmp: Path | None = None,
) -> list[str]:
    """The bwrap argv that starts ``bash`` in a fresh sandbox.

    ``sockets``: a host folder bound read-only at ``/run/megaflow`` (`SOCKET_DIR`): the
    agent's unix sockets appear there (a connect needs no write access), the sandbox's
    only way to the outside.
    ``writable_dirs``: (host folder, absolute path) pairs: more writable folders besides
    /workspace and /tmp (e.g. Harbor's /logs, /tests, /solution), each a private host
    folder of the sandbox.
    ``seccomp_fd``: a readable descriptor holding the BPF program of
    :mod:`megaflow.env.local.seccomp` (bwrap reads it once, at start).
    ``tmp``: a host folder (the sandbox's quota'd tmpfs) bound as ``/tmp``; None: a
    private tmpfs of bwrap's.
    """
    argv = [
        BWRAP,
        "--unshare-user",
        "--uid",
        "0",
        "--gid",
        "0",
        "--unshare-cgroup",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        hostname,
        "--tmpfs",
        "/",
    ]
    for name in IMAGE_ENTRIES:
        source = image_root / name
        if source.is_symlink():
            argv += ["--symlink", os.readlink(source), f"/{name}"]
        elif source.is_dir():
            argv += ["--ro-bind", str(source), f"/{name}"]
    for name in MASKED_FILES:
        if (image_root / name).is_file():
            argv += ["--ro-bind", "/dev/null", f"/{name}"]
    path = ":".join([SAFE_PATH, *extra_path])
    argv += [
        "--dir",
        WORKDIR,
        "--bind",
        str(workspace),
        WORKDIR,
        "--dir",
        INBOX,
        "--ro-bind",
        str(inbox),
        INBOX,
        *(["--dir", SOCKET_DIR, "--ro-bind", str(sockets), SOCKET_DIR] if sockets else []),
        *(
            arg
            for host, path in writable_dirs
            for arg in ("--dir", path, "--bind", str(host), path)
        ),
        *(["--dir", "/tmp", "--bind", str(tmp), "/tmp"] if tmp else ["--tmpfs", "/tmp"]),
        "--proc",
        "/proc",
        # Real root needs no capability to write sysctls: keep /proc/sys read-only.
        "--ro-bind",
        "/proc/sys",
        "/proc/sys",
        "--ro-bind-try",
        "/proc/sysrq-trigger",
        "/proc/sysrq-trigger",
        *(
            arg
            for entry in MASKED_PROC
            if os.path.exists(entry)  # the sandbox's /proc has the host kernel's entries
            for arg in ("--ro-bind", "/dev/null", entry)
        ),
        "--dev",
        "/dev",
        "--remount-ro",
        "/",
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--chdir",
        WORKDIR,
        "--clearenv",
        "--setenv",
        "PATH",
        path,
        "--setenv",
        "HOME",
        WORKDIR,
        "--setenv",
        "TERM",
        "dumb",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--as-pid-1",
        "--",
        "bash",
        "--noprofile",
        "--norc",
        "-c",
        INIT_SCRIPT,
    ]
    return argv


def image_has_bash(image_root: Path) -> bool:
    """Whether the image offers ``bash`` where the sandbox's ``PATH`` finds it."""
    return any((image_root / d / "bash").exists() for d in ("usr/bin", "bin", "usr/local/bin"))


SETPRIV = "/usr/bin/setpriv"


def launcher_argv(bwrap: list[str], procs_files: Sequence[Path], uid: int) -> list[str]:
    """Wrap ``bwrap`` so it joins the sandbox's cgroups *before* it execs, as ``uid``.

    ``/bin/sh`` (root) writes its own pid into each ``cgroup.procs``, then becomes
    ``setpriv``, which drops to ``uid``/``uid`` without supplementary groups or any
    capability and becomes bwrap: bwrap and everything it starts are limited from the
    first instruction and never hold the host's root.
    """
    drop = [
        SETPRIV,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    if not procs_files:
        return [*drop, *bwrap]
    joins = " && ".join(f"echo $$ > {shlex.quote(str(p))}" for p in procs_files)
    return ["/bin/sh", "-c", f'{joins} && exec "$@"', "megaflow-sandbox", *drop, *bwrap]
