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
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
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
