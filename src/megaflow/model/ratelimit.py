"""Per-client rate limits: token buckets for requests/min and tokens/min.

Pure: every call takes `now` (seconds on any monotonic clock) explicitly, so the limiter
is tested without sleeping. `RateLimiter.reserve(client, tokens, now, max_wait_s)`
either admits the request now (returns 0.0), admits it after a wait that fits within
`max_wait_s` (returns the wait; the capacity is reserved, so the bucket may go
negative), or rejects it without consuming anything (returns None). `charge` debits
tokens learnt after the fact (a completion's length).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class RateLimitConfig(BaseModel):
    """Limits applied to every client id separately; 0 disables a limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_min: float = Field(default=0.0, ge=0, description="Requests per minute; 0: off.")
    tokens_per_min: float = Field(
        default=0.0, ge=0, description="Prompt+completion tokens per minute; 0: off."
    )
    burst_s: float = Field(
        default=1.0,
        gt=0,
        description="Bucket depth in seconds of rate (how much a quiet client may burst).",
    )
    max_clients: int = Field(
        default=100_000, ge=1, description="Buckets kept; the least recently used are dropped."
    )


@dataclass
class TokenBucket:
    """`rate` units/s, at most `depth` banked; `level` may go negative after a reservation."""

    rate: float
    depth: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.depth, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are available (0 if they are now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate


class RateLimiter:
    """Token buckets keyed by client id; see the module docstring."""

    def __init__(self, config: RateLimitConfig | None = None) -> None:
        self.config = config or RateLimitConfig()
        self._buckets: OrderedDict[str, tuple[TokenBucket | None, TokenBucket | None]] = (
            OrderedDict()
        )

    @property
    def enabled(self) -> bool:
        return bool(self.config.requests_per_min or self.config.tokens_per_min)

    def _bucket(self, per_min: float, now: float) -> TokenBucket | None:
        if not per_min:
            return None
        rate = per_min / 60.0
        depth = max(rate * self.config.burst_s, 1.0)
        return TokenBucket(rate=rate, depth=depth, level=depth, stamp=now)

    def _pair(self, client: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        pair = self._buckets.get(client)
        if pair is None:
            pair = (
                self._bucket(self.config.requests_per_min, now),
                self._bucket(self.config.tokens_per_min, now),
            )
            self._buckets[client] = pair
            while len(self._buckets) > self.config.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        for bucket in pair:
            if bucket is not None:
                bucket.refill(now)
        return pair

    def reserve(self, client: str, tokens: int, now: float, max_wait_s: float) -> float | None:
        """Admit one request of `tokens` tokens: the wait in seconds, or None (rejected)."""
        if not self.enabled:
            return 0.0
        requests, token_bucket = self._pair(client, now)
        wait = 0.0
        if requests is not None:
            wait = max(wait, requests.wait_for(1.0))
        if token_bucket is not None:
            # A request bigger than the whole bucket waits for a full bucket, not forever.
            wait = max(wait, token_bucket.wait_for(min(float(tokens), token_bucket.depth)))
        if wait > max_wait_s:
            return None
        if requests is not None:
            requests.level -= 1.0
        if token_bucket is not None:
            token_bucket.level -= float(tokens)
        return wait

    def charge(self, client: str, tokens: int, now: float) -> None:
        """Debit tokens learnt after the request (e.g. its completion)."""
        if not self.config.tokens_per_min or tokens <= 0:
            return
        _, token_bucket = self._pair(client, now)
        if token_bucket is not None:
            token_bucket.level -= float(tokens)
