"""A latency model of a GPU inference server, for the simulated backend.

The server has `slots` concurrent batch slots. A request holds one slot for

    time_scale * (overhead_s + prefill_s_per_token * prompt_tokens
                  + decode_s_per_token * completion_tokens)

seconds; requests beyond `slots` wait in FIFO order. Everything runs on the
event loop (one timer per sleeping request, one future per queued request), so
thousands of concurrent requests are cheap. With `time_scale=0` nothing sleeps
and requests are admitted at once (tests). Times are measured on the monotonic
clock, i.e. real seconds: with `time_scale=1` they are the modelled seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from pydantic import BaseModel, ConfigDict, Field


class LatencyConfig(BaseModel):
    """Shape of the simulated inference server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slots: int = Field(
        default=64, ge=1, description="Concurrent batch slots; more requests queue FIFO."
    )
    prefill_s_per_token: float = Field(
        default=0.0002, ge=0, description="Seconds per prompt token."
    )
    decode_s_per_token: float = Field(
        default=0.004, ge=0, description="Seconds per completion token."
    )
    overhead_s: float = Field(
        default=0.0, ge=0, description="Fixed seconds added to every request."
    )
    time_scale: float = Field(
        default=1.0,
        ge=0,
        description="Multiplies every service time; 0 disables sleeping entirely.",
    )


class GpuLatencyModel:
    """Slots, a FIFO queue and per-token service times; see the module docstring."""

    def __init__(self, config: LatencyConfig | None = None, **overrides: float) -> None:
        base = config or LatencyConfig()
        self.config = (
            LatencyConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base
        )
        self._free = self.config.slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._requests = 0
        self._busy_done = 0.0  # slot-seconds of finished service
        self._epoch = time.monotonic()
        self._busy_starts = 0.0  # sum of the start times (since _epoch) of the services in flight
        self._in_flight = 0
        self._first: float | None = None

    def service_time(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Modelled seconds of one request, before `time_scale`."""
        c = self.config
        return (
            c.overhead_s
            + c.prefill_s_per_token * max(prompt_tokens, 0)
            + c.decode_s_per_token * max(completion_tokens, 0)
        )

    async def run(self, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        """Queue for a slot, hold it for the service time; (queue_s, service_s), measured."""
        loop = asyncio.get_running_loop()
        arrived = time.monotonic()
        if self._first is None:
            self._first = arrived
        self._requests += 1
        await self._acquire(loop)
        started = time.monotonic()
        self._in_flight += 1
        self._busy_starts += started - self._epoch
        try:
            delay = self.service_time(prompt_tokens, completion_tokens) * self.config.time_scale
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            ended = time.monotonic()
            self._in_flight -= 1
            self._busy_starts -= started - self._epoch
            self._busy_done += ended - started
            self._release()
        return started - arrived, ended - started

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot straight to the next in line
                return
        self._free += 1

    @property
    def in_flight(self) -> int:
        """Requests holding a slot."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return sum(1 for w in self._waiters if not w.done())

    @property
    def requests(self) -> int:
        """Requests received since start."""
        return self._requests

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
