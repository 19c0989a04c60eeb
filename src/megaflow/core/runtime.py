"""Process-level tuning for services that hold tens of thousands of tasks.

CPython's cyclic garbage collector pauses the event loop, and every step in flight
waits for the pause. With 30,000 agent loops (each ~90 tracked objects: coroutines,
contexts, futures, timer handles) two things go wrong with the defaults:

- a full collection walks every object (~3 million): pauses of a second;
- young collections are triggered by *net* allocations (allocations minus
  deallocations), and in a steady state old objects die as fast as new ones are
  made, so the young generation grows to hundreds of thousands of objects before a
  collection is due: pauses of 0.1-0.8 s (measured by `bench/scale_bench.py`).

`GcPolicy` replaces the allocation triggers with a clock: automatic collection is
off; a timer collects the youngest generation every `young_every_s` (what was
allocated in that time: pauses of about a millisecond), the middle one every
`middle_every` young collections, and everything every `full_every_s` seconds, so
reference cycles among old objects are still reclaimed. `gc.freeze()` at start
keeps modules, protobuf descriptors and other objects that live as long as the
process out of every collection.

`GcPauses` measures what the collector costs (count, total and longest pause).

`coarse_timeout_at` is `asyncio.timeout_at` for long deadlines (a task's 30 minutes,
a model call's 5): asyncio keeps every timeout in one heap of timer handles ordered
by Python comparisons, and a timeout that is cancelled (the common case: the work
finished in time) stays in it until more than half the heap is cancelled, when the
whole heap is rebuilt in one step. With 30,000 tasks that is a heap of ~100,000
handles, every push and pop ~17 comparisons, and rebuilds of tens of milliseconds
during which the loop runs nothing else. Coarse timeouts share one timer handle per
`COARSE_RESOLUTION_S` of deadlines, and leaving one early is a dict removal; a
deadline fires up to `COARSE_RESOLUTION_S` late.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class GcPolicy(BaseModel):
    """How a long-running service drives the garbage collector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True, description="Apply this policy; False leaves CPython's defaults."
    )
    young_every_s: float = Field(
        default=0.02, gt=0, description="Seconds between collections of the youngest generation."
    )
    middle_every: int = Field(
        default=5, ge=1, description="Collect the middle generation every N young collections."
    )
    full_every_s: float = Field(
        default=600.0, gt=0, description="Seconds between full collections."
    )


class GcTuner:
    """Applies a `GcPolicy` for the life of a service; `stop()` restores the defaults."""

    def __init__(self, policy: GcPolicy | None = None) -> None:
        self.policy = policy or GcPolicy()
        self._was_enabled: bool | None = None
        self._timer: asyncio.Task[None] | None = None
        self.collections = [0, 0, 0]  # per generation, by this tuner

    def start(self) -> None:
        if not self.policy.enabled or self._was_enabled is not None:
            return
        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        self._timer = asyncio.get_running_loop().create_task(self._collect(), name="gc-tuner")

    async def _collect(self) -> None:
        policy = self.policy
        next_full = time.monotonic() + policy.full_every_s
        young = 0
        while True:
            await asyncio.sleep(policy.young_every_s)
            young += 1
            if time.monotonic() >= next_full:
                generation = 2
                next_full = time.monotonic() + policy.full_every_s
            elif young % policy.middle_every == 0:
                generation = 1
            else:
                generation = 0
            started = time.perf_counter()
            freed = gc.collect(generation)
            self.collections[generation] += 1
            if generation == 2:
                log.info("full collection: %d freed in %.3fs", freed, time.perf_counter() - started)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if self._was_enabled is not None:
            if self._was_enabled:
                gc.enable()
            gc.unfreeze()
            self._was_enabled = None


class GcPauses:
    """Counts the collector's pauses from now until `close()`."""

    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.count += 1
        self.total_s += pause
        self.max_s = max(self.max_s, pause)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)


COARSE_RESOLUTION_S = 1.0
"""Granularity of coarse deadlines: one timer handle per this many seconds of them."""
_COARSE_MIN_S = 30.0  # nearer deadlines get an exact `asyncio.Timeout`


class _Wheel:
    """The coarse deadlines of one event loop, bucketed by `COARSE_RESOLUTION_S`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, dict[CoarseTimeout, None]] = {}

    def add(self, timeout: CoarseTimeout, when: float) -> int:
        slot = math.ceil(when / COARSE_RESOLUTION_S)
        bucket = self.slots.get(slot)
        if bucket is None:
            bucket = self.slots[slot] = {}
            self.loop.call_at(slot * COARSE_RESOLUTION_S, self._fire, slot)
        bucket[timeout] = None
        return slot

    def remove(self, timeout: CoarseTimeout, slot: int) -> None:
        bucket = self.slots.get(slot)
        if bucket is not None:
            bucket.pop(timeout, None)

    def _fire(self, slot: int) -> None:
        for timeout in self.slots.pop(slot, {}):
            timeout.expire()


_wheels: dict[asyncio.AbstractEventLoop, _Wheel] = {}


def _wheel(loop: asyncio.AbstractEventLoop) -> _Wheel:
    wheel = _wheels.get(loop)
    if wheel is None or wheel.loop.is_closed():
        for old in [closed for closed in _wheels if closed.is_closed()]:
            del _wheels[old]
        wheel = _wheels[loop] = _Wheel(loop)
    return wheel


class CoarseTimeout:
    """`asyncio.timeout_at` semantics (the task is cancelled at the deadline and
    `TimeoutError` raised from the block) with a deadline kept in a shared wheel."""

    __slots__ = ("_cancelling", "_expired", "_slot", "_task", "_wheel", "_when")

    def __init__(self, when: float) -> None:
        self._when = when
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._slot = 0
        self._wheel: _Wheel | None = None
        self._expired = False

    def expired(self) -> bool:
        """Whether the deadline passed and cancelled the block."""
        return self._expired

    def expire(self) -> None:
        if self._task is not None and not self._expired:
            self._expired = True
            self._task.cancel()

    async def __aenter__(self) -> CoarseTimeout:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("CoarseTimeout must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._wheel = _wheel(task.get_loop())
        self._slot = self._wheel.add(self, self._when)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None and self._wheel is not None
        self._wheel.remove(self, self._slot)
        if self._expired:
            # like asyncio.Timeout: our cancellation becomes a TimeoutError, unless
            # someone else cancelled the task too
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc


def coarse_timeout_at(when: float) -> CoarseTimeout | asyncio.Timeout:
    """A timeout at loop time `when`: coarse (see the module) when it is at least
    `_COARSE_MIN_S` away, else an exact `asyncio.timeout_at`."""
    loop = asyncio.get_running_loop()
    if when - loop.time() < _COARSE_MIN_S:
        return asyncio.timeout_at(when)
    return CoarseTimeout(when)


def coarse_timeout(delay_s: float) -> CoarseTimeout | asyncio.Timeout:
    """`coarse_timeout_at` `delay_s` from now."""
    return coarse_timeout_at(asyncio.get_running_loop().time() + delay_s)
