"""Jitter for every retry and periodic loop of the services.

Without it, every service that saw the same event (a scheduler restart, a store that
went away) retries on the same schedule: a thousand heartbeats fail together, back off
together, and land together on the restarted scheduler, in lockstep, at every step of
their backoff (a restart stampede). Every wait of a retry loop in MegaFlow goes through
this module instead:

- `Backoff`: "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"):
  the n-th wait is uniform in [0, min(cap, base * 2**n)], at least `floor`.
- `spread(delay)`: a periodic wait (a heartbeat, a poll) drawn from
  [delay * (1 - fraction), delay]: never later than the period, so deadlines computed
  from it still hold, but never two processes in step for long.

Each process draws from its own generator, seeded from its pid and the clock, so that
two services started together do not draw the same waits. `MEGAFLOW_JITTER=off` (or
`set_enabled(False)`) turns jitter off, for the stampede benchmark's "before" arm;
`MEGAFLOW_JITTER=<int>` seeds the generator (a reproducible run).
"""

from __future__ import annotations

import os
import random
import time

__all__ = ["Backoff", "enabled", "full", "reseed", "set_enabled", "spread"]


def _from_env() -> tuple[bool, random.Random]:
    value = os.environ.get("MEGAFLOW_JITTER", "").strip().lower()
    if value in ("off", "0", "false", "no"):
        return False, random.Random(0)
    try:
        return True, random.Random(int(value))
    except ValueError:
        return True, random.Random(os.getpid() ^ time.time_ns())


_enabled, _rng = _from_env()


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    """Turn jitter on or off for this process (a benchmark compares both)."""
    global _enabled
    _enabled = on


def reseed(seed: int | None = None) -> None:
    """A new generator for this process (None: from the pid and the clock). A forked
    child calls it so that it does not draw its parent's waits."""
    global _rng
    _rng = random.Random(os.getpid() ^ time.time_ns() if seed is None else seed)


def full(ceiling: float) -> float:
    """Uniform in [0, ceiling] (`ceiling` itself with jitter off)."""
    return _rng.uniform(0.0, ceiling) if _enabled and ceiling > 0 else max(ceiling, 0.0)


def spread(delay: float, fraction: float = 0.25) -> float:
    """Uniform in [delay * (1 - fraction), delay] (`delay` itself with jitter off)."""
    if not _enabled or delay <= 0:
        return max(delay, 0.0)
    return delay * (1.0 - _rng.uniform(0.0, min(max(fraction, 0.0), 1.0)))


class Backoff:
    """Capped exponential backoff with full jitter: `next()` is the wait before the
    next retry, `reset()` after a success. With jitter off the waits are
    base, 2 * base, 4 * base... up to `cap` (the lockstep schedule)."""

    def __init__(self, base: float, cap: float, floor: float = 0.0) -> None:
        if base < 0 or cap < 0 or floor < 0:
            raise ValueError(f"Backoff(base={base}, cap={cap}, floor={floor}): must be >= 0")
        self.base, self.cap, self.floor = base, cap, min(floor, cap)
        self.retries = 0

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2.0 ** min(self.retries, 60))

    def next(self) -> float:
        ceiling = self.ceiling()
        self.retries += 1
        return max(self.floor, full(ceiling))

    def reset(self) -> None:
        self.retries = 0
