"""Per-call resilience against a flaky model server: retry policy, call budget, breaker.

- `RetryPolicy`: how often and how long a retryable upstream failure (HTTP 429, 500,
  502, 503, 504, a reset or refused connection, a timeout) is retried: exponential
  backoff with full jitter (a uniform draw in [0, min(max, base * 2**n)]), or the
  server's `Retry-After` when it sends one, never past the call's deadline.
- `call_scope(deadline, failover)`: what the Model Service tells the backend about one
  call without widening the `ModelBackend` protocol: the monotonic deadline that the
  backend's retries must fit in, and whether another healthy replica could take the
  call (then a failed attempt is handed back to the service at once, which fails it
  over, instead of being retried on the same upstream).
- `CircuitBreaker`: per replica, CLOSED -> OPEN after `failure_threshold` failed calls
  in a row; OPEN (skipped by the router) for `cooldown_s`; then HALF_OPEN: one trial
  call at a time; its success closes the breaker, its failure re-opens it. The clock
  is injected, so the state machine is tested without sleeping.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "CallScope",
    "CircuitBreaker",
    "RetryPolicy",
    "backoff_delay",
    "call_scope",
    "current_call",
    "parse_retry_after",
]


class RetryPolicy(BaseModel):
    """Retries of one model call's retryable upstream failures."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_retries: int = Field(
        default=4, ge=0, description="Retries after the first attempt (0: no retry)."
    )
    base_backoff_s: float = Field(
        default=0.2, ge=0, description="Backoff ceiling of the first retry; doubles each retry."
    )
    max_backoff_s: float = Field(
        default=5.0, ge=0, description="Largest backoff ceiling (and largest Retry-After obeyed)."
    )


def backoff_delay(policy: RetryPolicy, retry: int, rng: random.Random | None = None) -> float:
    """Full-jitter backoff before retry number `retry` (0-based): uniform in
    [0, min(max_backoff_s, base_backoff_s * 2**retry)]."""
    ceiling = min(policy.max_backoff_s, policy.base_backoff_s * (2 ** min(retry, 30)))
    return (rng or random).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date (as
    seconds from `now`, wall-clock epoch seconds; default: time.time()). None if absent
    or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class CallScope:
    """What the caller tells a backend about the call in progress."""

    deadline: float | None = None  # time.monotonic() after which nothing is attempted
    failover: bool = False  # another healthy replica can take a failed attempt

    def remaining(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.monotonic() if now is None else now)


_NO_SCOPE = CallScope()
_CALL: ContextVar[CallScope | None] = ContextVar("megaflow_model_call", default=None)


def current_call() -> CallScope:
    """The scope set by the enclosing `call_scope` (a default one outside any)."""
    return _CALL.get() or _NO_SCOPE


class call_scope:  # used like a function: `with call_scope(...):`
    """Set the call's deadline (monotonic) and failover flag for the backend call inside.
    An enclosing scope's earlier deadline is kept. (A class, not a generator: it runs
    on every model request.)"""

    __slots__ = ("_token", "scope")

    def __init__(self, deadline: float | None = None, *, failover: bool = False) -> None:
        outer = _CALL.get()
        if outer is not None and outer.deadline is not None:
            if deadline is None or outer.deadline < deadline:
                deadline = outer.deadline
        self.scope = CallScope(deadline=deadline, failover=failover)
        self._token: Token[CallScope | None] | None = None

    def __enter__(self) -> CallScope:
        self._token = _CALL.set(self.scope)
        return self.scope

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _CALL.reset(self._token)
            self._token = None


class BreakerConfig(BaseModel):
    """When a replica's breaker opens and how long it stays open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    failure_threshold: int = Field(
        default=5, ge=1, description="Failed calls in a row (retries exhausted) that open it."
    )
    cooldown_s: float = Field(
        default=5.0, ge=0, description="Seconds it stays open before one trial call."
    )


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed / open / half-open, per replica; `clock` is injected (default monotonic)."""

    def __init__(
        self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures_in_a_row = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.opened = 0  # times it opened
        self.rejected = 0  # calls that found it open

    @property
    def state(self) -> BreakerState:
        """The state now: an OPEN breaker past its cool-down reads HALF_OPEN."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.config.cooldown_s
        ):
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def available(self) -> bool:
        """Whether a call may be sent now (no side effect): closed, or half-open with no
        trial call in flight."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._trial_in_flight

    def acquire(self) -> bool:
        """Claim the right to send one call; a half-open breaker lets one through."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        self.rejected += 1
        return False

    def success(self) -> None:
        self._failures_in_a_row = 0
        self._trial_in_flight = False
        self._state = BreakerState.CLOSED

    def failure(self) -> bool:
        """Count one failed call; True if it (re)opened the breaker."""
        self._failures_in_a_row += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED
            and self._failures_in_a_row >= self.config.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._trial_in_flight = False
            self.opened += 1
            return True
        return False

    def release(self) -> None:
        """A claimed call ended with neither success nor an upstream failure (e.g. it
        was cancelled or rejected as invalid): free the half-open trial slot."""
        self._trial_in_flight = False
