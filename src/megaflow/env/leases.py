"""Environments handed to agents, their leases, and the reaper.

Each environment holds a lease renewed by every call and heartbeat. The reaper
releases environments whose lease ran out (an agent that vanished cannot leak a
sandbox) and, when `idle_suspend_s` is set, freezes environments idle that long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from megaflow.env.backends import SandboxSpec
from megaflow.env.sandbox import Sandbox

log = logging.getLogger(__name__)


@dataclass
class Environment:
    """One sandbox handed to one owner."""

    env_id: str
    owner: str
    spec: SandboxSpec
    sandbox: Sandbox
    persistent: bool
    hidden_files: dict[str, bytes]
    eval_command: str
    lease_s: float
    lease_expires: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    steps: int = 0
    last_output: str = ""
    suspended: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def renew(self, lease_s: float | None = None) -> None:
        if lease_s:
            self.lease_s = lease_s
        self.last_used = time.monotonic()
        self.lease_expires = self.last_used + self.lease_s


class Reaper:
    """Runs `sweep` every ``interval_s`` until stopped."""

    def __init__(
        self,
        envs: dict[str, Environment],
        *,
        interval_s: float,
        idle_suspend_s: float | None,
        release: Callable[[str], Awaitable[None]],
        suspend: Callable[[Environment], Awaitable[None]],
    ) -> None:
        self._envs = envs
        self._interval_s = interval_s
        self._idle_suspend_s = idle_suspend_s
        self._release = release
        self._suspend = suspend
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="env-lease-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> None:
        now = time.monotonic()
        for env in [e for e in self._envs.values() if e.lease_expires < now]:
            log.warning("lease of %s (owner %s) expired; releasing it", env.env_id, env.owner)
            await self._release(env.env_id)
        if self._idle_suspend_s is None:
            return
        idle_since = now - self._idle_suspend_s
        for env in list(self._envs.values()):
            if not env.suspended and not env.lock.locked() and env.last_used < idle_since:
                try:
                    await self._suspend(env)
                except Exception as exc:
                    log.debug("idle suspend of %s skipped: %s", env.env_id, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep()
            except Exception:  # the reaper must survive whatever one sandbox does
                log.exception("lease reaper sweep failed")
