"""Process-level tuning for services that hold tens of thousands of tasks.

CPython's cyclic garbage collector walks every tracked object of the oldest
generation on a full collection: with 30,000 agent loops in flight (each ~90 tracked
objects: coroutines, contexts, futures, timer handles) that is a pause of hundreds of
milliseconds, every few seconds while the heap grows, and every step in flight waits
for it. `GcPolicy` trades those for one full collection on a fixed period:

- `gc.freeze()` once the service has started, so that modules, protobuf descriptors
  and other objects that live as long as the process are never walked again;
- the young generations keep collecting as usual (short pauses: they hold only what
  was allocated since the last collection);
- automatic full collections are off; a timer runs one every `full_every_s` seconds
  (reference cycles among old objects are reclaimed then, not lost).

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

_NEVER = 1 << 30  # a gen-2 threshold that automatic collection never reaches


class GcPolicy(BaseModel):
    """How a long-running service drives the garbage collector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True, description="Apply this policy; False leaves CPython's defaults."
    )
    young_threshold: int = Field(
        default=10_000,
        ge=100,
        description="Net allocations that trigger a young (gen 0) collection.",
    )
    full_every_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds between full collections (automatic ones are turned off).",
    )


class GcTuner:
    """Applies a `GcPolicy` for the life of a service; `stop()` restores the defaults."""

    def __init__(self, policy: GcPolicy | None = None) -> None:
        self.policy = policy or GcPolicy()
        self._saved: tuple[int, int, int] | None = None
        self._timer: asyncio.Task[None] | None = None
        self.full_collections = 0

    def start(self) -> None:
        if not self.policy.enabled or self._saved is not None:
            return
        self._saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(self.policy.young_threshold, 10, _NEVER)
        self._timer = asyncio.get_running_loop().create_task(self._collect_periodically())

    async def _collect_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.policy.full_every_s)
            started = time.perf_counter()
            freed = gc.collect()
            self.full_collections += 1
            log.debug("full collection: %d freed in %.3fs", freed, time.perf_counter() - started)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None


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
