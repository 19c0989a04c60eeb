"""A latency model of a GPU inference server, for the simulated backend.

Continuous batching: the server has `slots` batch slots and, optionally, a KV-cache
budget of `kv_tokens` tokens. A request holds one slot and `prompt + completion`
tokens of KV for

    time_scale * (overhead_s + prefill_s_per_token * uncached_prompt_tokens
                  + decode_s_per_token * completion_tokens * batch_factor)

seconds, where `batch_factor = 1 + decode_batch_slowdown * (running - 1) / slots` makes
decoding mildly slower as the batch fills. Requests are admitted in FIFO order when a
slot is free *and* their KV fits (a request larger than the whole budget runs alone);
the others wait.

Prefix cache (`prefix_cache_tokens > 0`): a request with a `prefix_key` (e.g. its task
id) whose previous turn is cached pays prefill only for the new suffix; when it
finishes, its `prompt + completion` tokens become the cached prefix for that key. The
cache is LRU, bounded in tokens; `prefix_hit_rate()` reports hits / keyed requests.

Streaming (`stream`): the same slot, KV and times, but the prefill comes first and
then the completion tokens one after another at the decode rate, reported as they are
produced (a few tokens per wake-up when one token takes under `min_step_s`).

Everything runs on the event loop (one timer per running request, one future per
waiting one), so thousands of concurrent requests are cheap. With `time_scale=0`
nothing sleeps. Times are monotonic-clock seconds. `utilisation()` is busy slot-time /
(slots x time since the first request).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class LatencyConfig(BaseModel):
    """Shape of the simulated inference server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slots: int = Field(
        default=64, ge=1, description="Concurrent batch slots; more requests queue FIFO."
    )
    prefill_s_per_token: float = Field(
        default=0.0002, ge=0, description="Seconds per (uncached) prompt token."
    )
    decode_s_per_token: float = Field(
        default=0.004, ge=0, description="Seconds per completion token, alone in the batch."
    )
    overhead_s: float = Field(
        default=0.0, ge=0, description="Fixed seconds added to every request."
    )
    time_scale: float = Field(
        default=1.0,
        ge=0,
        description="Multiplies every service time; 0 disables sleeping entirely.",
    )
    kv_tokens: int = Field(
        default=0,
        ge=0,
        description=(
            "KV-cache budget in tokens; a running request holds prompt+completion tokens. "
            "0: unlimited (only slots bound the batch)."
        ),
    )
    decode_batch_slowdown: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Decode time grows by this fraction when the batch is full (linear in the "
            "number of running requests); 0: decode cost independent of batch size."
        ),
    )
    prefix_cache_tokens: int = Field(
        default=0,
        ge=0,
        description="Prefix-cache capacity in tokens (LRU over prefix keys); 0: no cache.",
    )
    jitter: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description=(
            "Each service time is multiplied by a uniform draw in [1 - jitter, 1 + jitter] "
            "(a seeded, deterministic sequence): real turn times vary, so concurrent "
            "requests do not stay in lockstep. 0: exact service times."
        ),
    )
    seed: int = Field(default=0, description="Seed of the jitter sequence.")


class Served(NamedTuple):
    """One request's times: waited for a slot, measured service, intended service."""

    queue_s: float
    service_s: float
    modelled_s: float


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    kv: int


class GpuLatencyModel:
    """Slots, a KV budget, a FIFO queue, a prefix cache; see the module docstring."""

    def __init__(self, config: LatencyConfig | None = None, **overrides: float) -> None:
        base = config or LatencyConfig()
        self.config = (
            LatencyConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base
        )
        self._free = self.config.slots
        self._kv_used = 0
        self._waiters: deque[_Waiter] = deque()
        self._requests = 0
        self._busy_done = 0.0  # slot-seconds of finished service
        self._epoch = time.monotonic()
        self._busy_starts = 0.0  # sum of the start times (since _epoch) of the services in flight
        self._in_flight = 0
        self._first: float | None = None
        self._cache: OrderedDict[str, int] = OrderedDict()  # prefix key -> cached tokens
        self._cache_used = 0
        self._lookups = 0
        self._hits = 0
        self._keyed_prompt_tokens = 0
        self._cached_prompt_tokens = 0
        self._rng = random.Random(self.config.seed)

    def service_time(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, batch: int = 1
    ) -> float:
        """Modelled seconds of one request, before `time_scale`."""
        c = self.config
        uncached = max(prompt_tokens, 0) - min(max(cached_tokens, 0), max(prompt_tokens, 0))
        factor = 1.0 + c.decode_batch_slowdown * max(batch - 1, 0) / c.slots
        return (
            c.overhead_s
            + c.prefill_s_per_token * uncached
            + c.decode_s_per_token * max(completion_tokens, 0) * factor
        )

    def jitter_factor(self) -> float:
        """The next draw of the seeded jitter sequence (1.0 without jitter)."""
        if not self.config.jitter:
            return 1.0
        return 1.0 + self.config.jitter * (2.0 * self._rng.random() - 1.0)

    async def run(
        self, prompt_tokens: int, completion_tokens: int, prefix_key: str | None = None
    ) -> tuple[float, float]:
        """Queue for a slot and KV, hold them for the service time; (queue_s, service_s)."""
        served = await self.serve(prompt_tokens, completion_tokens, prefix_key)
        return served.queue_s, served.service_s

    async def serve(
        self, prompt_tokens: int, completion_tokens: int, prefix_key: str | None = None
    ) -> Served:
        """`run`, also saying how long the service was meant to take (`modelled_s`)."""
        loop = asyncio.get_running_loop()
        arrived, started, kv = await self._enter(loop, prompt_tokens, completion_tokens)
        delay = 0.0
        try:
            cached = self._lookup(prefix_key, prompt_tokens)
            service = self.service_time(prompt_tokens, completion_tokens, cached, self._in_flight)
            delay = service * self.jitter_factor() * self.config.time_scale
            if delay > 0:
                await asyncio.sleep(delay)
            self._remember(prefix_key, prompt_tokens + completion_tokens)
        finally:
            ended = self._leave(started, kv)
        return Served(started - arrived, ended - started, delay)

    async def stream(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        prefix_key: str | None = None,
        *,
        min_step_s: float = 0.005,
    ) -> AsyncGenerator[int, None]:
        """`serve`, token by token: yields 0 once a slot is held, then after the prefill
        the number of completion tokens produced so far, as they are produced (the
        last value is `completion_tokens`). The slot is held until the iterator ends or
        is closed (`aclose()`, e.g. when the caller is cancelled)."""
        loop = asyncio.get_running_loop()
        _, started, kv = await self._enter(loop, prompt_tokens, completion_tokens)
        try:
            yield 0
            c = self.config
            cached = self._lookup(prefix_key, prompt_tokens)
            scale = self.jitter_factor() * c.time_scale
            prefill = self.service_time(prompt_tokens, 0, cached) * scale
            per_token = self.service_time(0, 1, 0, self._in_flight) - c.overhead_s
            per_token *= scale
            # Each token is due at a fixed time from the start (no drift from late wake-ups).
            begun = loop.time()
            if prefill > 0:
                await asyncio.sleep(prefill)
            total = max(completion_tokens, 0)
            step = max(1, math.ceil(min_step_s / per_token)) if per_token > 0 else max(total, 1)
            done = 0
            while done < total:
                done += min(step, total - done)
                if per_token > 0:
                    delay = begun + prefill + per_token * done - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                yield done
            self._remember(prefix_key, prompt_tokens + completion_tokens)
        finally:
            self._leave(started, kv)

    # -- admission ------------------------------------------------------------------------

    async def _enter(
        self, loop: asyncio.AbstractEventLoop, prompt_tokens: int, completion_tokens: int
    ) -> tuple[float, float, int]:
        """Count a request, queue it for a slot and its KV; (arrived, started, kv)."""
        arrived = time.monotonic()
        if self._first is None:
            self._first = arrived
        self._requests += 1
        kv = max(prompt_tokens, 0) + max(completion_tokens, 0) if self.config.kv_tokens else 0
        await self._acquire(loop, kv)
        started = time.monotonic()
        self._in_flight += 1
        self._busy_starts += started - self._epoch
        return arrived, started, kv

    def _leave(self, started: float, kv: int) -> float:
        """A request that `_enter`ed at `started` ends: its slot and KV freed; the time."""
        ended = time.monotonic()
        self._in_flight -= 1
        self._busy_starts -= started - self._epoch
        self._busy_done += ended - started
        self._release(kv)
        return ended

    def _fits(self, kv: int) -> bool:
        if self._free <= 0:
            return False
        budget = self.config.kv_tokens
        return not budget or self._kv_used + kv <= budget or self._kv_used == 0

    async def _acquire(self, loop: asyncio.AbstractEventLoop, kv: int) -> None:
        if not self._waiters and self._fits(kv):
            self._free -= 1
            self._kv_used += kv
            return
        waiter = _Waiter(loop.create_future(), kv)
        self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(kv)  # admitted just as we were cancelled
            else:
                self._waiters.remove(waiter)
                self._admit()  # the head may have been blocking others
            raise

    def _release(self, kv: int) -> None:
        self._free += 1
        self._kv_used -= kv
        self._admit()

    def _admit(self) -> None:
        """Admit waiters in FIFO order while the head fits."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            if not self._fits(head.kv):
                return
            self._waiters.popleft()
            self._free -= 1
            self._kv_used += head.kv
            head.future.set_result(None)

    # -- prefix cache ---------------------------------------------------------------------

    def _lookup(self, key: str | None, prompt_tokens: int) -> int:
        if key is None or not self.config.prefix_cache_tokens:
            return 0
        self._lookups += 1
        self._keyed_prompt_tokens += max(prompt_tokens, 0)
        cached = self._cache.get(key, 0)
        if cached:
            self._cache.move_to_end(key)
            hit = min(cached, max(prompt_tokens, 0))
            if hit:
                self._hits += 1
                self._cached_prompt_tokens += hit
            return hit
        return 0

    def _remember(self, key: str | None, tokens: int) -> None:
        capacity = self.config.prefix_cache_tokens
        if key is None or not capacity or tokens > capacity:
            return
        self._cache_used += tokens - self._cache.pop(key, 0)
        self._cache[key] = tokens
        while self._cache_used > capacity:
            _, evicted = self._cache.popitem(last=False)
            self._cache_used -= evicted

    # -- figures --------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests holding a slot."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot or KV."""
        return sum(1 for w in self._waiters if not w.future.done())

    @property
    def requests(self) -> int:
        """Requests received since start."""
        return self._requests

    @property
    def kv_in_use(self) -> int:
        """KV tokens held by running requests (0 when no budget is configured)."""
        return self._kv_used

    @property
    def prefix_cached_tokens(self) -> int:
        """Tokens held by the prefix cache."""
        return self._cache_used

    def prefix_hit_rate(self) -> float:
        """Keyed requests that found a cached prefix / keyed requests (0 without any)."""
        return self._hits / self._lookups if self._lookups else 0.0

    def prefix_token_hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens of keyed requests."""
        if not self._keyed_prompt_tokens:
            return 0.0
        return self._cached_prompt_tokens / self._keyed_prompt_tokens

    def utilisation(self) -> float:
        """Busy slot-seconds / (slots x seconds since the first request), in [0, 1]."""
        if self._first is None:
            return 0.0
        now = time.monotonic()
        elapsed = now - self._first
        if elapsed <= 0:
            return 0.0
        busy = self._busy_done + self._in_flight * (now - self._epoch) - self._busy_starts
        return max(0.0, min(1.0, busy / (self.config.slots * elapsed)))
