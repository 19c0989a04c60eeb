"""Memory and pids limits for local sandboxes through Linux cgroups.

Three cases are handled:

- **v1** (separate hierarchies per controller, as on the project's machines): a
  sandbox gets one child cgroup under the process's *own* cgroup in the ``memory``
  hierarchy and one in the ``pids`` hierarchy.
- **v2** (unified hierarchy): a sandbox gets one child cgroup, either under the
  process's own cgroup (when it may enable controllers there) or, best effort, beside
  it under the parent, whose ``cgroup.subtree_control`` already hands the controllers
  down.
- **none**: no usable controller; sandboxes run without limits and
  :func:`cgroup_support` says why.

Detection runs once per process, lazily, and probes by creating and removing one
empty cgroup per controller.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megaflow.core.errors import SandboxError
from megaflow.env.local.freezer import freeze_file

CGROUP_FS_ROOT = Path("/sys/fs/cgroup")
"""Every cgroup path this module creates or removes lies under this folder."""

_LIMIT_FILES = {
    "memory": ("memory.limit_in_bytes", "memory.max"),
    "pids": ("pids.max",),
    "cpu": ("cpu.shares", "cpu.weight"),
    "freezer": ("freezer.state", "cgroup.freeze"),
}
_V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
CPU_SHARES_DEFAULT = 1024
"""The kernel's default v1 ``cpu.shares``: a sandbox with it gets an equal CPU share."""


@dataclass(frozen=True)
class CgroupSupport:
    """What resource limits local sandboxes get on this machine."""

    version: Literal["v1", "v2", "none"]
    """The cgroup flavour in use for sandboxes ("none": no limits at all)."""
    memory: bool
    """Whether the memory limit (``memory_mib``) is enforced."""
    pids: bool
    """Whether the process-count limit (``pids``) is enforced."""
    detail: str
    """Human-readable explanation (where the cgroups go, or why there are none)."""
    cpu: bool = False
    """Whether the CPU share (``cpu_shares``: v1 ``cpu.shares``, v2 ``cpu.weight``) applies."""
    freezer: bool = False
    """Whether sandboxes can be suspended (v1 ``freezer.state``, v2 ``cgroup.freeze``)."""


@dataclass(frozen=True)
class CgroupLayout:
    """Where sandbox cgroups are created: ``(controller, base folder)`` pairs.

    For v1 each controller has its own base; for v2 one base carries both, under the
    pseudo-controller name ``"unified"``.
    """

    support: CgroupSupport
    bases: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class _Mount:
    root: str
    mountpoint: Path
    fstype: str
    superopts: frozenset[str]


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040``) of /proc/self/mountinfo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _cgroup_mounts() -> list[_Mount]:
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, sep, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if not sep or len(fields) < 5 or len(tail) < 3:
                continue
            if tail[0] not in ("cgroup", "cgroup2"):
                continue
            mounts.append(
                _Mount(
                    root=_unescape(fields[3]),
                    mountpoint=Path(_unescape(fields[4])),
                    fstype=tail[0],
                    superopts=frozenset(tail[2].split(",")),
                )
            )
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Map controller name (``""`` for the v2 hierarchy) to this process's cgroup path."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    return own


def _folder(mount: _Mount, cgroup_path: str) -> Path | None:
    """The folder of ``cgroup_path`` inside ``mount``, if that mount shows it."""
    root = mount.root.rstrip("/")
    if cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    rel = cgroup_path[len(root) :].lstrip("/")
    return mount.mountpoint / rel if rel else mount.mountpoint


def _probe(base: Path, control_files: Iterable[str]) -> str | None:
    """Create and remove an empty child of ``base``; return why it failed, or None."""
    probe = base / f"megaflow-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup under {base}: {exc.strerror}"
    try:
        if not any((probe / name).exists() for name in control_files):
            return f"{base} children lack {'/'.join(control_files)}"
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _detect_v1(mounts: list[_Mount], own: dict[str, str]) -> CgroupLayout | None:
    bases: list[tuple[str, Path]] = []
    notes: list[str] = []
    for controller in _V1_CONTROLLERS:
        mount = next(
            (m for m in mounts if m.fstype == "cgroup" and controller in m.superopts), None
        )
        if mount is None or controller not in own:
            continue
        base = _folder(mount, own[controller])
        problem = "no folder for own cgroup" if base is None else None
        if base is not None:
            problem = _probe(base, _LIMIT_FILES[controller])
        if base is None or problem:
            notes.append(f"{controller}: {problem}")
        else:
            bases.append((controller, base))
            notes.append(f"{controller} under {base}")
    if not bases:
        return None if not notes else _none("cgroup v1 unusable: " + "; ".join(notes))
    names = {name for name, _ in bases}
    if not names & {"memory", "pids"}:
        return _none("cgroup v1 has neither memory nor pids: " + "; ".join(notes))
    support = CgroupSupport(
        "v1",
        "memory" in names,
        "pids" in names,
        "; ".join(notes),
        cpu="cpu" in names,
        freezer="freezer" in names,
    )
    return CgroupLayout(support, tuple(bases))


def _enabled(base: Path, wanted: set[str]) -> set[str]:
    """Try to enable ``wanted`` controllers for ``base``'s children; return those enabled."""
    for controller in sorted(wanted):
        with contextlib.suppress(OSError):
            (base / "cgroup.subtree_control").write_text(f"+{controller}")
    try:
        return wanted & set((base / "cgroup.subtree_control").read_text().split())
    except OSError:
        return set()


def _detect_v2(mounts: list[_Mount], own: dict[str, str]) -> CgroupLayout | None:
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mount is None or "" not in own:
        return None
    own_dir = _folder(mount, own[""])
    if own_dir is None:
        return _none("cgroup v2: own cgroup is not visible in the mounted hierarchy")
    notes = []
    candidates = [own_dir]
    if own_dir != mount.mountpoint:
        candidates.append(own_dir.parent)
    for base in candidates:
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        wanted = {"memory", "pids", "cpu"} & available
        # Only the own cgroup gets a write; the parent is used as its manager left it.
        on = _enabled(base, wanted) if base == own_dir else wanted & _subtree(base)
        if not on & {"memory", "pids"}:
            notes.append(f"{base}: cannot enable memory/pids for children")
            continue
        problem = _probe(base, [f for c in sorted(on) for f in _LIMIT_FILES[c]])
        if problem:
            notes.append(problem)
            continue
        detail = f"unified, {'+'.join(sorted(on))} (+freeze) under {base}"
        # cgroup.freeze is a core file of every non-root v2 cgroup: no controller needed.
        support = CgroupSupport("v2", "memory" in on, "pids" in on, detail, "cpu" in on, True)
        return CgroupLayout(support, (("unified", base),))
    return _none("cgroup v2 unusable: " + ("; ".join(notes) or "no controllers"))


def _subtree(base: Path) -> set[str]:
    try:
        return set((base / "cgroup.subtree_control").read_text().split())
    except OSError:
        return set()


def _none(detail: str) -> CgroupLayout:
    return CgroupLayout(CgroupSupport("none", False, False, detail), ())


@functools.cache
def cgroup_layout() -> CgroupLayout:
    """Detect (once per process) where sandbox cgroups go."""
    mounts, own = _cgroup_mounts(), _own_cgroups()
    v1 = _detect_v1(mounts, own)
    if v1 is not None and v1.support.version == "v1":
        return v1
    v2 = _detect_v2(mounts, own)
    if v2 is not None and v2.support.version == "v2":
        return v2
    reasons = [layout.support.detail for layout in (v1, v2) if layout is not None]
    return _none("; ".join(reasons) or "no cgroup filesystem mounted")


def cgroup_support() -> CgroupSupport:
    """What limits local sandboxes get on this machine (detected once, then cached)."""
    return cgroup_layout().support


@dataclass(frozen=True)
class SandboxCgroups:
    """The cgroup folders of one sandbox (none when limits are unavailable)."""

    dirs: tuple[Path, ...]

    @classmethod
    def create(
        cls,
        layout: CgroupLayout,
        name: str,
        *,
        memory_bytes: int,
        pids: int,
        cpu_shares: int = CPU_SHARES_DEFAULT,
    ) -> SandboxCgroups:
        """Create the sandbox's cgroups with their limits; raise SandboxError on failure."""
        made: list[Path] = []
        try:
            for controller, base in layout.bases:
                folder = base / name
                folder.mkdir()
                made.append(folder)
                if controller in ("memory", "unified"):
                    _set_memory(folder, memory_bytes)
                if controller in ("pids", "unified"):
                    _write_if_present(folder / "pids.max", str(pids))
                if controller in ("cpu", "unified") and cpu_shares != CPU_SHARES_DEFAULT:
                    _write_if_present(folder / "cpu.shares", str(cpu_shares))
                    _write_if_present(folder / "cpu.weight", str(shares_to_weight(cpu_shares)))
        except OSError as exc:
            cls(tuple(made)).remove(timeout_s=1.0)
            raise SandboxError(f"cannot set up cgroup {name}: {exc}") from exc
        return cls(tuple(made))

    @property
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process must be written to, to join the sandbox."""
        return [folder / "cgroup.procs" for folder in self.dirs]

    def pids(self) -> set[int]:
        """Host pids of every process in the sandbox's cgroups."""
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in procs.read_text().split())
        return found

    @property
    def freezer_file(self) -> Path | None:
        """The sandbox's freezer control file (v1 ``freezer.state``, v2 ``cgroup.freeze``)."""
        return freeze_file(self.dirs)

    def oom_kills(self) -> int:
        """Processes the sandbox's own memory limit has killed so far (v1
        ``memory.oom_control``, v2 ``memory.events``: ``oom_kill N``); 0 where unknown."""
        kills = 0
        for folder in self.dirs:
            for name in ("memory.oom_control", "memory.events"):
                with contextlib.suppress(OSError, ValueError):
                    for line in (folder / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            kills += int(value)
        return kills

    def remove(self, timeout_s: float = 2.0) -> None:
        """Remove the (emptied) cgroup folders, retrying while the kernel still holds them."""
        remove_cgroup_dirs(self.dirs, timeout_s=timeout_s)


def shares_to_weight(shares: int) -> int:
    """v1 ``cpu.shares`` (2..262144, default 1024) as v2 ``cpu.weight`` (1..10000, 100)."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142 if shares != CPU_SHARES_DEFAULT else 100


def _set_memory(folder: Path, memory_bytes: int) -> None:
    if (folder / "memory.limit_in_bytes").exists():  # v1; memsw must stay >= the limit
        (folder / "memory.limit_in_bytes").write_text(str(memory_bytes))
        _write_if_present(folder / "memory.memsw.limit_in_bytes", str(memory_bytes))
    else:
        _write_if_present(folder / "memory.max", str(memory_bytes))
        _write_if_present(folder / "memory.swap.max", "0")


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        path.write_text(value)


def remove_cgroup_dirs(dirs: Iterable[Path], *, timeout_s: float) -> None:
    """rmdir each cgroup folder (blocking); folders outside the cgroup fs are refused."""
    deadline = time.monotonic() + timeout_s
    for folder in dirs:
        if not folder.is_relative_to(CGROUP_FS_ROOT):
            continue
        while True:
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise SandboxError(f"cannot remove cgroup {folder}: {exc}") from exc
                time.sleep(0.005)


def cgroup_pids(dirs: Iterable[Path]) -> set[int]:
    """Host pids listed in the ``cgroup.procs`` of each folder (missing folders skipped)."""
    return SandboxCgroups(tuple(dirs)).pids()


def cgroup_hierarchies() -> list[tuple[Path, Path | None]]:
    """Each mounted cgroup hierarchy (v1 or v2): its root folder, and this process's own
    cgroup folder in it (None where the mount does not show it)."""
    own = _own_cgroups()
    found: list[tuple[Path, Path | None]] = []
    for mount in _cgroup_mounts():
        keys = [""] if mount.fstype == "cgroup2" else [k for k in own if k in mount.superopts]
        path = own.get(keys[0]) if keys else None
        found.append((mount.mountpoint, _folder(mount, path) if path is not None else None))
    return found
