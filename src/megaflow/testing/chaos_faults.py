"""Faults the chaos driver makes in sandboxes, and its view of the run's ledger.

A sandbox *kill* SIGKILLs a live sandbox's bwrap from outside (what ``docker kill`` or a
node's OOM killer does); a *hang* freezes a running sandbox's freezer cgroup from
outside (what ``docker pause`` or a stuck kernel does: its commands never answer).
Both pick, where there is one, a sandbox a task is using: for a kill, one suspended by
its env service (its agent waits for the model) or running a command; for a hang, one
running a command now. The env services must turn either into a retryable
infrastructure failure of that attempt (see `LocalSandbox`), never a scored outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from megaflow.env.local import procs
from megaflow.env.local.freezer import freeze_file, frozen_now, request_freeze
from megaflow.store.ledger import LedgerRow, TaskLedger

T = TypeVar("T")
_BUSY = 4  # outer bwrap, the sandbox's init, the shell, and a command


@dataclass(frozen=True)
class SandboxRef:
    """A live sandbox of an env service, as seen from outside."""

    env: str
    sandbox_id: str
    freezer: Path | None  # its freezer.state / cgroup.freeze
    pids: tuple[int, ...]
    bwrap: int | None  # the outer bwrap: the member whose parent is the env service

    @property
    def frozen(self) -> bool:
        return self.freezer is not None and frozen_now([self.freezer.parent])

    @property
    def busy(self) -> bool:
        return len(self.pids) >= _BUSY


def live_sandboxes(sandbox_dirs: dict[str, Path], env_pids: dict[str, int]) -> list[SandboxRef]:
    """The sandboxes of each env service (by name: its sandbox folder and its pid)."""
    found = []
    for env, root in sandbox_dirs.items():
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            try:
                record = json.loads((folder / "owner.json").read_text())
                cgroups = [Path(p) for p in record["cgroups"]]
            except (OSError, ValueError, KeyError):
                continue  # being made or being removed
            freezer = freeze_file(cgroups)
            pids: tuple[int, ...] = ()
            with contextlib.suppress(OSError, ValueError):
                members = (freezer.parent if freezer else cgroups[0]) / "cgroup.procs"
                pids = tuple(int(line) for line in members.read_text().split())
            bwrap = next((p for p in pids if procs.parent_of(p) == env_pids.get(env)), None)
            if pids:
                found.append(SandboxRef(env, folder.name, freezer, pids, bwrap))
    return found


def _pick(
    rng: random.Random, sandboxes: list[SandboxRef], preferred: list[SandboxRef]
) -> tuple[SandboxRef | None, bool]:
    if preferred:
        return rng.choice(preferred), True
    return (rng.choice(sandboxes), False) if sandboxes else (None, False)


def _wait_for(
    find: Callable[[], tuple[list[SandboxRef], list[SandboxRef]]],
    give_up: Callable[[], bool],
    poll_s: float = 0.005,
) -> tuple[list[SandboxRef], list[SandboxRef]]:
    """(candidates, in use) once one in use appears, or once `give_up()` (a point of
    the run's progress, never a clock: a loaded machine only makes the wait longer)."""
    while True:
        candidates, in_use = find()
        if in_use or give_up():
            return candidates, in_use
        time.sleep(poll_s)


def _never() -> bool:
    return True


def kill_sandbox(
    rng: random.Random,
    sandbox_dirs: dict[str, Path],
    env_pids: dict[str, int],
    give_up: Callable[[], bool] = _never,
) -> dict[str, Any]:
    """SIGKILL the bwrap of a live sandbox: one in use (suspended by its env service
    while its agent waits for the model, or running a command), waited for until
    `give_up()` says the run got too far (default: at once), then any live one."""

    def find() -> tuple[list[SandboxRef], list[SandboxRef]]:
        live = [s for s in live_sandboxes(sandbox_dirs, env_pids) if s.bwrap is not None]
        return live, [s for s in live if s.frozen or s.busy]

    sandboxes, busy = _wait_for(find, give_up)
    target, in_use = _pick(rng, sandboxes, busy)
    if target is None or target.bwrap is None:
        return {"skipped": "no live sandbox"}
    with contextlib.suppress(ProcessLookupError):
        os.kill(target.bwrap, signal.SIGKILL)
    return {"sandbox": target.sandbox_id, "env_name": target.env, "in_use": in_use}


def hang_sandbox(
    rng: random.Random,
    sandbox_dirs: dict[str, Path],
    env_pids: dict[str, int],
    give_up: Callable[[], bool] = _never,
) -> dict[str, Any]:
    """Freeze a running sandbox from outside: one running a command (during a step of a
    task), waited for until `give_up()`, else any running one (a pooled one: its next
    claim probes it)."""

    def find() -> tuple[list[SandboxRef], list[SandboxRef]]:
        running = [
            s
            for s in live_sandboxes(sandbox_dirs, env_pids)
            if s.freezer is not None and not s.frozen
        ]
        return running, [s for s in running if s.busy]

    running, busy = _wait_for(find, give_up)
    target, in_use = _pick(rng, running, busy)
    if target is None or target.freezer is None:
        return {"skipped": "no running sandbox with a freezer"}
    with contextlib.suppress(Exception):  # it may be gone by now: then nothing hangs
        request_freeze(target.freezer, True)
    return {"sandbox": target.sandbox_id, "env_name": target.env, "in_use": in_use}


class LedgerView:
    """The run's ledger as the driver reads it (sync; its own event loop): progress
    while the run goes, every row at the end. Any backend `open_ledger` takes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()

    def _read(self, fn: Callable[[TaskLedger], Awaitable[T]]) -> T:
        from megaflow.store.factory import open_ledger

        async def read() -> T:
            ledger = open_ledger(self.url)
            await ledger.open()
            try:
                return await fn(ledger)
            finally:
                await ledger.close()

        return self._loop.run_until_complete(asyncio.wait_for(read(), 30.0))

    def finished(self) -> int:
        """Tasks in a terminal state, whether or not the client's watch is connected
        (after a scheduler restart it catches up in a burst); 0 when unreadable."""
        try:
            return sum(run.terminal for run in self._read(lambda ledger: ledger.runs()))
        except Exception:  # not created yet, or busy: no progress seen this time
            return 0

    def rows(self) -> list[LedgerRow]:
        """Every task row of every run."""

        async def every(ledger: TaskLedger) -> list[LedgerRow]:
            return [r for run in await ledger.runs() for r in await ledger.run(run.run_id)]

        return self._read(every)

    def close(self) -> None:
        self._loop.close()
