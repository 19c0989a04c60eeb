"""Sandbox pools and the hard cap.

Every sandbox holds one *slot* from the moment it is reserved (before it starts) until
its teardown is under way: in use, starting, resetting and idle in a pool all count,
so `max_environments` is never overshot. Reserving is synchronous (no `await` between
the check and the increment), hence atomic on the event loop.

A pool per `SandboxSpec` keeps idle, started sandboxes: warm ones (never used) and,
in persistent mode, used ones reset to the image state. A claim takes an idle sandbox
after a liveness probe (dead ones are discarded), or starts a new one; claims of a
warm spec then refill its pool in the background. When the cap is reached, an idle
sandbox of another spec is evicted to make room.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any

from megaflow.core.errors import (
    CapacityError,
    DeadlineExceededError,
    InvalidRequestError,
    SandboxError,
)
from megaflow.env import backends
from megaflow.env.backends import SandboxFactory, SandboxSpec
from megaflow.env.config import EnvServiceConfig
from megaflow.env.sandbox import Sandbox

log = logging.getLogger(__name__)

RESET_TIMEOUT_S = 30.0
REFILL_DELAY_S = 0.01
"""Pause before background refills and resets, so the reply that triggered them goes out
before they block the loop for a few ms."""


class SandboxPool:
    """Reserves slots, starts, pools, resets and stops sandboxes."""

    def __init__(self, config: EnvServiceConfig, factory: SandboxFactory, prefix: str) -> None:
        self.config = config
        self.factory = factory
        self._prefix = prefix
        self._ids = itertools.count()
        self.slots = 0
        """Sandboxes that exist or are being made: in use + starting + resetting + idle."""
        self.handed_out = 0
        self._idle: dict[SandboxSpec, deque[Sandbox]] = {}
        self._warm: dict[SandboxSpec, int] = {}
        self._pristine: dict[SandboxSpec, bytes] = {}
        """Per spec, the workdir of a sandbox right after start (what a reset restores)."""
        self._refills: dict[SandboxSpec, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Validate the warm-pool settings and start filling the warm pools."""
        for image, size in self.config.warm_pool.items():
            if size > 0:
                self._warm[self.factory.spec(image)] = size
        for spec in self._warm:
            self._refill_soon(spec)

    async def wait_refills(self) -> None:
        """Wait until the refills under way are done (tests and benchmarks)."""
        while running := [t for t in self._refills.values() if not t.done()]:
            await asyncio.gather(*running, return_exceptions=True)

    async def stop(self) -> None:
        """Stop refilling, finish resets, stop every idle sandbox and every teardown.

        Called once every holder gave its sandboxes back: any sandbox still built and
        not released is a leak, stopped too (a suspended one would otherwise outlive
        this process, frozen: its bwrap cannot die of its parent's death until thawed).
        """
        self._closing = True
        await self.wait_refills()
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        for queue in self._idle.values():
            while queue:
                await self.discard(queue.popleft())
        for sandbox in self.factory.unreleased():
            log.error("sandbox %s was held by nobody at shutdown; stopping it", sandbox.sandbox_id)
            await self._stop_quietly(sandbox, free_slot=False)

    # -- figures -------------------------------------------------------------------------
    @property
    def idle(self) -> int:
        return sum(map(len, self._idle.values()))

    @property
    def starting(self) -> int:
        """Slots of sandboxes being started or reset (neither idle nor handed out)."""
        return self.slots - self.idle - self.handed_out

    def target(self, spec: SandboxSpec) -> int:
        """How many idle sandboxes the pool of ``spec`` keeps warm."""
        if spec in self._warm:
            return self._warm[spec]
        cfg = self.config
        default_limits = (spec.memory_mib, spec.pids, spec.output_bytes) == (
            cfg.memory_mib,
            cfg.pids,
            cfg.output_bytes,
        )
        plain = default_limits and not spec.cpu_shares and not spec.disk_mib
        return cfg.warm_pool_default if plain else 0

    # -- slots ---------------------------------------------------------------------------
    def reserve(self) -> Sandbox | None:
        """Take one slot (atomic). At the cap, take the slot of an idle pooled sandbox
        instead and return that sandbox: the caller stops it before starting
        its own, so sandboxes that exist never outnumber the cap. CapacityError if
        nothing can be freed."""
        if self._try_reserve():
            return None
        victim = self._evict_one()
        if victim is None:
            raise CapacityError(f"all {self.config.max_environments} environment slots are in use")
        return victim

    def _try_reserve(self) -> bool:
        if self._closing:
            raise CapacityError("the Environment Service is shutting down")
        if self.slots < self.config.max_environments:
            self.slots += 1
            return True
        return False

    def _evict_one(self) -> Sandbox | None:
        fullest = max(self._idle.values(), key=len, default=None)
        return fullest.popleft() if fullest else None

    # -- claim and give back -----------------------------------------------------------
    async def claim(self, spec: SandboxSpec, setup_s: float) -> tuple[Sandbox, bool]:
        """A started, live sandbox of ``spec`` and whether it came from the pool."""
        queue = self._idle.get(spec)
        while queue:
            sandbox = queue.popleft()
            self.handed_out += 1
            try:
                alive = await backends.probe(sandbox, self.config.liveness_timeout_s)
            except BaseException:  # cancelled mid-probe: the sandbox may be mid-command
                self.handed_out -= 1
                self._spawn(self._stop_quietly(sandbox), "pool-discard")
                raise
            if alive:
                self._refill_soon(spec)
                return sandbox, True
            log.warning(
                "pooled sandbox %s failed its liveness probe; discarding it", sandbox.sandbox_id
            )
            self.handed_out -= 1
            self._spawn(self._stop_quietly(sandbox), "pool-discard")
        victim = self.reserve()
        self.handed_out += 1
        try:
            if victim is not None:  # its slot is ours once it is gone
                evict = self._spawn(self._stop_quietly(victim, free_slot=False), "pool-evict")
                await asyncio.shield(evict)
            sandbox = await self._start_new(spec, setup_s)
        except BaseException:
            self.handed_out -= 1
            self.slots -= 1
            raise
        self._refill_soon(spec)
        return sandbox, False

    async def give_back(self, spec: SandboxSpec, sandbox: Sandbox, *, reuse: bool) -> None:
        """A handed-out sandbox comes back: stopped, or (``reuse``) reset and pooled."""
        self.handed_out -= 1
        if not reuse or self._closing or not sandbox.alive:
            await self.discard(sandbox)
            return
        self._spawn(self._reset_and_pool(spec, sandbox), "pool-reset")

    async def discard(self, sandbox: Sandbox) -> None:
        """Stop a sandbox and free its slot; the teardown completes even if the caller is
        cancelled (stop() waits for it)."""
        await asyncio.shield(self._spawn(self._stop_quietly(sandbox), "sandbox-teardown"))

    # -- internals -----------------------------------------------------------------------
    async def _start_new(self, spec: SandboxSpec, setup_s: float) -> Sandbox:
        """A started sandbox of ``spec`` (the first of a spec also gives its pristine
        snapshot). Whatever ends this early, cancellation included, stops the sandbox:
        nobody else holds it yet."""
        sandbox = await self.factory.build(f"sb-{self._prefix}-{next(self._ids)}", spec)
        try:
            try:
                async with asyncio.timeout(setup_s):
                    await sandbox.start(timeout_s=setup_s)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"sandbox setup passed its {setup_s:.1f}s budget"
                ) from None
            if spec not in self._pristine:
                try:
                    self._pristine[spec] = await backends.snapshot(sandbox)
                except Exception as exc:  # reset then empties the workdir instead
                    log.debug("no pristine snapshot of %s: %s", spec.image, exc)
        except BaseException:
            teardown = self._spawn(self._stop_quietly(sandbox, free_slot=False), "sandbox-teardown")
            await asyncio.shield(teardown)
            raise
        return sandbox

    async def _reset_and_pool(self, spec: SandboxSpec, sandbox: Sandbox) -> None:
        await asyncio.sleep(REFILL_DELAY_S)  # the release's reply first (see _refill)
        try:
            await backends.reset(sandbox, RESET_TIMEOUT_S, self._pristine.get(spec))
        except Exception as exc:
            log.warning(
                "sandbox %s could not be reset (%s); discarding it", sandbox.sandbox_id, exc
            )
            await self._stop_quietly(sandbox)
            return
        queue = self._idle.setdefault(spec, deque())
        keep = max(self.target(spec), self.config.max_idle_per_key)
        if self._closing or len(queue) >= keep:
            await self._stop_quietly(sandbox)
        else:
            queue.append(sandbox)

    def _refill_soon(self, spec: SandboxSpec) -> None:
        if self._closing or self.target(spec) == 0:
            return
        running = self._refills.get(spec)
        if running is None or running.done():
            self._refills[spec] = self._spawn(self._refill(spec), "pool-refill")

    async def _refill(self, spec: SandboxSpec) -> None:
        # Starting a sandbox blocks the loop for a few ms (folders, cgroups, spawn): let
        # the reply of the claim that triggered this go out first.
        await asyncio.sleep(REFILL_DELAY_S)
        queue = self._idle.setdefault(spec, deque())
        while not self._closing and len(queue) < self.target(spec):
            if not self._try_reserve():
                return  # the cap is reached: real claims come first
            try:
                sandbox = await self._start_new(spec, self.config.setup_timeout_s)
            except (SandboxError, DeadlineExceededError, InvalidRequestError, OSError) as exc:
                # InvalidRequestError: an image that does not exist or cannot be pulled.
                self.slots -= 1
                log.warning("warm pool refill of %s failed: %s", spec.image, exc)
                return
            except BaseException:
                self.slots -= 1
                raise
            if self._closing:
                await self._stop_quietly(sandbox)
                return
            queue.append(sandbox)

    async def _stop_quietly(self, sandbox: Sandbox, *, free_slot: bool = True) -> None:
        """Stop a sandbox and free its slot (unless it passes to someone else)."""
        try:
            await sandbox.stop()
        except Exception as exc:
            log.error("sandbox %s: teardown failed: %s", sandbox.sandbox_id, exc)
        finally:
            self.factory.released(sandbox)
            if free_slot:
                self.slots -= 1

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
