"""Host-side views of a sandbox's processes, read from /proc (Linux only).

A sandbox is one bwrap process on the host (the *outer* bwrap, outside the sandbox's
pid namespace) whose child is the namespace's init (pid 1 inside), whose child is the
persistent shell (pid 2 inside); everything else is the *workload*.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

INIT_NS_PID = 1
SHELL_NS_PID = 2


def ns_pids(pid: int) -> list[int] | None:
    """The ``NSpid:`` line of /proc/PID/status (outermost first), or None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return [int(p) for p in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


@functools.cache
def own_ns_depth() -> int:
    """How many pid namespaces /proc shows for this process (1 outside containers)."""
    return len(ns_pids(os.getpid()) or [os.getpid()])


@dataclass(frozen=True)
class Member:
    """One process of a sandbox: its host pid and its pid inside the sandbox (0: outside)."""

    host_pid: int
    ns_pid: int


def classify(host_pids: Iterable[int]) -> list[Member]:
    """Tag host pids with their pid in the sandbox's namespace (0 for the outer bwrap)."""
    depth = own_ns_depth()
    members = []
    for pid in host_pids:
        chain = ns_pids(pid)
        if chain is None:
            continue
        members.append(Member(pid, chain[depth] if len(chain) > depth else 0))
    return members


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (via /proc/PID/task/*/children, else a /proc scan)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        return found
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []
    except (OSError, ValueError):
        pass
    return [p for p in _all_pids() if parent_of(p) == pid]


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid``, or None if it is gone."""
    stat = _stat_fields(pid)
    return int(stat[1]) if stat else None


def start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (tells a reused pid apart)."""
    stat = _stat_fields(pid)
    return int(stat[19]) if stat else None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def pid_namespace(pid: int) -> int | None:
    """Inode of the pid namespace of ``pid``."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def pids_in_namespace(ns_inode: int) -> list[int]:
    """Host pids of every process whose pid namespace is ``ns_inode`` (a /proc scan)."""
    return [p for p in _all_pids() if pid_namespace(p) == ns_inode]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def kill(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    """Signal each pid, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def alive(pid: int, ticks: int | None) -> bool:
    """Whether ``pid`` still runs and (if ``ticks`` given) is the same process as then."""
    stat = _stat_fields(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return ticks is None or int(stat[19]) == ticks
