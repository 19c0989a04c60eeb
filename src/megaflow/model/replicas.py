"""Replicas: one backend each, with load counters, health and a lifecycle.

    WARMING ──(health checks pass)──► ACTIVE ──(new version deployed)──► DRAINING ──► RETIRED
                                        │ ▲                               (in-flight = 0:
          N consecutive failures (probes │ │ M consecutive successes        backend closed)
          or retryable request errors)   ▼ │
                                      unhealthy (kept, not routed to while a healthy one exists)

Circuit breaker (`megaflow.model.resilience.CircuitBreaker`, per replica): calls that
keep failing with retryable errors open it; an open breaker makes the replica read as
unhealthy to the router (skipped while a healthy one exists) for a cool-down, then one
trial call (half-open) closes it on success or re-opens it. Probes do not touch it: an
upstream can list its models and still fail every chat.

Health probes: a backend with an async `health_check()` method is asked directly; an
OpenAI-compatible upstream answers GET /v1/models within the probe timeout; anything
else (the simulated backend) is healthy until its replica is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from megaflow.model.backend import ModelBackend
from megaflow.model.openai import list_upstream_models
from megaflow.model.resilience import BreakerConfig, CircuitBreaker
from megaflow.model.router import ReplicaView
from megaflow.v1 import model_pb2

log = logging.getLogger(__name__)


class HealthConfig(BaseModel):
    """When a replica is taken out of rotation and brought back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(default=1.0, gt=0, description="Seconds between health probes.")
    timeout_s: float = Field(default=2.0, gt=0, description="Deadline of one health probe.")
    unhealthy_after: int = Field(
        default=3, ge=1, description="Consecutive failures (probes or requests) that take it out."
    )
    healthy_after: int = Field(
        default=2, ge=1, description="Consecutive successful probes that bring it back."
    )
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig,
        description="The per-replica circuit breaker over failed calls.",
    )


class ReplicaState(StrEnum):
    WARMING = "warming"
    ACTIVE = "active"
    DRAINING = "draining"
    RETIRED = "retired"


class Replica:
    """One backend serving one version of one model."""

    def __init__(
        self,
        replica_id: str,
        model: str,
        version: str,
        backend: ModelBackend,
        capacity: int,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.id = replica_id
        self.model = model
        self._version = version  # "" = whatever the backend reports (it may learn it late)
        self.backend = backend
        self.capacity = capacity
        self.state = ReplicaState.WARMING
        self.healthy = True
        self.in_flight = 0
        self.in_flight_tokens = 0
        self.queued = 0  # the backend's own queue, refreshed by health probes
        self.requests = 0
        self.failures = 0
        self._fails_in_a_row = 0
        self._oks_in_a_row = 0
        self.breaker = breaker or CircuitBreaker()
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return (
            f"Replica({self.id!r}, {self.version!r}, {self.state.value}, "
            f"healthy={self.healthy}, breaker={self.breaker.state.value})"
        )

    @property
    def version(self) -> str:
        """The version this replica serves: its deploy tag, else the backend's own."""
        return self._version or self.backend.version

    @property
    def accepting(self) -> bool:
        return self.state is ReplicaState.ACTIVE

    def view(self) -> ReplicaView:
        return ReplicaView(
            id=self.id,
            healthy=self.healthy and self.breaker.available(),
            accepting=self.accepting,
            in_flight=self.in_flight,
            in_flight_tokens=self.in_flight_tokens,
            queued=self.queued,
            capacity=self.capacity,
        )

    # -- load -----------------------------------------------------------------------------

    def begin(self, tokens: int) -> None:
        self.in_flight += 1
        self.in_flight_tokens += tokens
        self.requests += 1
        self._idle.clear()

    def end(self, tokens: int) -> None:
        self.in_flight -= 1
        self.in_flight_tokens -= tokens
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight; False if `timeout_s` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # -- health ---------------------------------------------------------------------------

    def record(self, ok: bool, config: HealthConfig) -> bool:
        """Count one outcome (probe or request); True if `healthy` changed."""
        if ok:
            self._oks_in_a_row += 1
            self._fails_in_a_row = 0
            if not self.healthy and self._oks_in_a_row >= config.healthy_after:
                self.healthy = True
                log.info("replica %s is healthy again", self.id)
                return True
            return False
        self.failures += 1
        self._fails_in_a_row += 1
        self._oks_in_a_row = 0
        if self.healthy and self._fails_in_a_row >= config.unhealthy_after:
            self.healthy = False
            log.warning("replica %s is unhealthy after %d failures", self.id, self._fails_in_a_row)
            return True
        return False

    async def probe(self, timeout_s: float) -> bool:
        """One health check; never raises."""
        if self.state is ReplicaState.RETIRED:
            return False
        backend: Any = self.backend
        try:
            async with asyncio.timeout(timeout_s):
                check = getattr(backend, "health_check", None)
                if check is not None:
                    return bool(await check())
                if self.backend.kind == "openai":
                    config = getattr(backend, "config", None)
                    api_key = getattr(config, "api_key", None)
                    await list_upstream_models(backend.base_url, timeout_s, api_key=api_key)
                stats = self.backend.stats()
                self.queued = int(stats.queued)
                return True
        except Exception as error:  # a failed probe is an answer, not a crash
            log.debug("health probe of %s failed: %s", self.id, error)
            return False

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        self.state = ReplicaState.RETIRED
        with contextlib.suppress(Exception):
            await self.backend.close()

    def info(self) -> model_pb2.ReplicaInfo:
        stats = self.backend.stats()
        return model_pb2.ReplicaInfo(
            id=self.id,
            model=self.model,
            version=self.version,
            backend=self.backend.kind,
            healthy=self.healthy,
            state=self.state.value,
            in_flight=self.in_flight,
            capacity=self.capacity,
            requests=self.requests,
            failures=self.failures,
            utilisation=stats.utilisation,
        )
