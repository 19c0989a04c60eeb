"""The cgroup freezer: suspend and resume every process of a sandbox.

v1 writes ``FROZEN``/``THAWED`` to ``freezer.state`` and reads it back until the
state settles; v2 writes ``1``/``0`` to ``cgroup.freeze`` and watches ``frozen 1``/
``frozen 0`` in ``cgroup.events``. Frozen processes cannot die (not even of SIGKILL,
on v1) until thawed: whoever kills a sandbox thaws it first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

from megaflow.core.errors import SandboxError

FREEZE_TIMEOUT_S = 5.0
"""How long a freeze or thaw may take to settle."""


def freeze_file(dirs: Iterable[Path]) -> Path | None:
    for folder in dirs:
        for name in ("freezer.state", "cgroup.freeze"):
            if (folder / name).exists():
                return folder / name
    return None


def request_freeze(control: Path, frozen: bool) -> None:
    """Ask the kernel to freeze (or thaw); :func:`freeze_settled` says when it is done."""
    v1 = control.name == "freezer.state"
    try:
        control.write_text(("FROZEN" if frozen else "THAWED") if v1 else ("1" if frozen else "0"))
    except OSError as exc:
        verb = "freeze" if frozen else "thaw"
        raise SandboxError(f"cannot {verb} {control.parent}: {exc}") from exc


def freeze_settled(control: Path, frozen: bool) -> bool:
    """Whether every process has reached the state asked for (v1 ``FROZEN``/``THAWED``,
    v2 ``frozen 1``/``frozen 0`` in ``cgroup.events``)."""
    try:
        if control.name == "freezer.state":
            return control.read_text().strip() == ("FROZEN" if frozen else "THAWED")
        return f"frozen {int(frozen)}" in (control.parent / "cgroup.events").read_text().split("\n")
    except OSError as exc:
        raise SandboxError(f"cannot read the freezer state of {control.parent}: {exc}") from exc


def set_frozen(control: Path, frozen: bool, *, timeout_s: float) -> None:
    """Freeze or thaw and wait (blocking, polling every 0.5 ms) until it has settled."""
    request_freeze(control, frozen)
    deadline = time.monotonic() + timeout_s
    while not freeze_settled(control, frozen):
        if time.monotonic() > deadline:
            state = "frozen" if frozen else "thawed"
            raise SandboxError(f"{control.parent} was not {state} within {timeout_s} s")
        time.sleep(0.0005)


def frozen_now(dirs: Iterable[Path]) -> bool:
    """Whether the sandbox's freezer is frozen or freezing, by whoever asked (one read;
    False where there is no freezer or it cannot be read)."""
    found = freeze_file(dirs)
    if found is None:
        return False
    try:
        if found.name == "freezer.state":
            return found.read_text().strip() != "THAWED"
        return found.read_text().strip() == "1"
    except OSError:
        return False


def thaw_if_frozen(dirs: Iterable[Path]) -> None:
    """Best effort: thaw the freezer among ``dirs`` (frozen processes cannot die)."""
    found = freeze_file(dirs)
    if found is not None:
        with contextlib.suppress(SandboxError):
            set_frozen(found, False, timeout_s=1.0)
