"""Owner records of sandbox folders, and reclaiming what a crashed process left.

Each sandbox folder ``root_dir/<sandbox_id>/`` holds ``owner.json``: the pid and
start time of the process that made it, and the sandbox's cgroup folders. A later
process calls :func:`reclaim_orphans` to kill, remove and delete what belongs to
owners that are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megaflow.env.local import procs
from megaflow.env.local.cgroups import cgroup_pids, remove_cgroup_dirs
from megaflow.env.local.freezer import thaw_if_frozen
from megaflow.env.local.quota import unmount_sandbox

OWNER_FILE = "owner.json"
UNOWNED_GRACE_S = 60.0
"""A folder with no owner file is reclaimed only once it is this old (it may be new)."""


@dataclass(frozen=True)
class Owner:
    """Who made a sandbox folder, and which cgroups belong to it."""

    pid: int
    start_ticks: int | None
    cgroups: tuple[Path, ...]

    @classmethod
    def current(cls, cgroups: tuple[Path, ...]) -> Owner:
        """This process as the owner of ``cgroups``."""
        return cls(os.getpid(), procs.start_ticks(os.getpid()), cgroups)

    def write(self, folder: Path) -> None:
        """Write the record into ``folder`` atomically."""
        record = {
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "cgroups": [str(p) for p in self.cgroups],
        }
        tmp = folder / f".{OWNER_FILE}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(folder / OWNER_FILE)

    @classmethod
    def read(cls, folder: Path) -> Owner | None:
        """The record in ``folder``, or None if missing or unreadable."""
        try:
            record = json.loads((folder / OWNER_FILE).read_text())
            return cls(
                int(record["pid"]),
                None if record.get("start_ticks") is None else int(record["start_ticks"]),
                tuple(Path(p) for p in record.get("cgroups", [])),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_alive(self) -> bool:
        """Whether the owning process still runs."""
        return procs.alive(self.pid, self.start_ticks)


def kill_cgroup_members(dirs: tuple[Path, ...], *, timeout_s: float = 2.0) -> None:
    """Thaw, then SIGKILL every process in ``dirs`` until they are empty (blocking)."""
    thaw_if_frozen(dirs)
    deadline = time.monotonic() + timeout_s
    while (pids := cgroup_pids(dirs) - {os.getpid()}) and time.monotonic() < deadline:
        procs.kill(pids)
        time.sleep(0.005)


_CREATOR = re.compile(r"^sb-(\d+)-")


def _creator_dead(folder: Path) -> bool:
    """True if the folder's name (`sb-<pid>-...`) names a process that no longer exists."""
    match = _CREATOR.match(folder.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reclaim_orphans(root_dir: Path) -> int:
    """Remove sandbox folders and cgroups whose owning process is dead.

    Returns how many sandbox folders were reclaimed. Folders of live owners (this
    process included) are left alone. Blocking: call through ``asyncio.to_thread``
    from async code.
    """
    root_dir = Path(root_dir)
    if not root_dir.is_dir():
        return 0
    reclaimed = 0
    for folder in sorted(root_dir.iterdir()):
        if folder.is_symlink() or not folder.is_dir():
            continue
        owner = Owner.read(folder)
        if owner is None:
            # Killed between making the folder and writing its owner file: the creator's
            # pid is in the name; wait out the grace period only if it may still be alive.
            with contextlib.suppress(OSError):
                young = time.time() - folder.stat().st_mtime < UNOWNED_GRACE_S
                if young and not _creator_dead(folder):
                    continue
            cgroups: tuple[Path, ...] = ()
        elif owner.is_alive():
            continue
        else:
            cgroups = owner.cgroups
        kill_cgroup_members(cgroups)
        with contextlib.suppress(Exception):
            remove_cgroup_dirs(cgroups, timeout_s=2.0)
        with contextlib.suppress(Exception):
            unmount_sandbox(folder)
        shutil.rmtree(folder, ignore_errors=True)
        reclaimed += 1
    return reclaimed
