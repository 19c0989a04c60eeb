"""Model pools and hot swaps: one name, its serving version, and versions draining.

A `ModelPool` holds the replicas of one model name. `hot_swap` moves it to a new
version with zero failed requests:

    1. warm   the new replicas start in WARMING (not routed to) and must pass
              `healthy_after` consecutive health probes within `warm_timeout_s`;
              if they don't, they are closed and the old version keeps serving
    2. shift  in one step (no await): new replicas become ACTIVE, the old ones
              DRAINING; from here every new request is routed to the new version,
              and requests queued for capacity are woken to re-route
    3. drain  wait until the old replicas have nothing in flight (`drain_timeout_s`)
    4. retire close the old backends and drop them from the pool

A request already dispatched to an old replica finishes there (its response says the
old version); one that fails there is retried on the new version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from megaflow.core.errors import ModelUnavailableError
from megaflow.model.backend import ModelBackend
from megaflow.model.replicas import HealthConfig, Replica, ReplicaState
from megaflow.model.resilience import BreakerConfig, CircuitBreaker
from megaflow.model.router import ReplicaView

log = logging.getLogger(__name__)


class ModelPool:
    """The replicas of one model name, and the requests waiting for capacity on them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version = ""
        self.replicas: list[Replica] = []
        self.specs: list[str] = []  # how to build this version's backends again, if known
        self.waiters: deque[asyncio.Future[None]] = deque()
        self._next_id = 0
        self.breaker = BreakerConfig()  # each new replica's circuit breaker
        self._swap_lock: asyncio.Lock | None = None

    def new_replica(
        self, backend: ModelBackend, version: str, capacity: int, state: ReplicaState
    ) -> Replica:
        tag = version or backend.version or "v"
        replica = Replica(
            f"{self.name}/{tag}/{self._next_id}",
            self.name,
            version,
            backend,
            capacity,
            CircuitBreaker(self.breaker),
        )
        self._next_id += 1
        replica.state = state
        return replica

    def add(self, replica: Replica) -> None:
        self.replicas.append(replica)
        self.wake_all()

    def current_version(self) -> str:
        """The deployed tag, else what the first active replica reports."""
        if self.version:
            return self.version
        active = self.active()
        return active[0].version if active else ""

    def active(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is ReplicaState.ACTIVE]

    def views(self) -> list[ReplicaView]:
        return [r.view() for r in self.replicas if r.state is ReplicaState.ACTIVE]

    def get(self, replica_id: str) -> Replica:
        for replica in self.replicas:
            if replica.id == replica_id:
                return replica
        raise KeyError(replica_id)

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    @property
    def swap_lock(self) -> asyncio.Lock:
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        return self._swap_lock


@dataclass(frozen=True)
class SwapReport:
    model: str
    version: str
    previous_version: str
    replicas: tuple[str, ...]
    retired: tuple[str, ...]
    swap_s: float
    drained: bool  # False if the drain timed out and in-flight requests were cut off


async def warm(replicas: Sequence[Replica], health: HealthConfig, timeout_s: float) -> None:
    """Probe each replica until it passes `healthy_after` probes in a row, or raise."""

    async def one(replica: Replica) -> None:
        oks = 0
        while oks < health.healthy_after:
            if await replica.probe(health.timeout_s):
                oks += 1
            else:
                oks = 0
                await asyncio.sleep(min(health.interval_s, 0.1))

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one(r) for r in replicas))
    except TimeoutError as error:
        names = ", ".join(r.id for r in replicas)
        raise ModelUnavailableError(
            f"new replicas ({names}) did not pass health checks within {timeout_s:g}s"
        ) from error


async def hot_swap(
    pool: ModelPool,
    version: str,
    backends: Sequence[ModelBackend],
    *,
    capacity: int,
    health: HealthConfig,
    warm_timeout_s: float,
    drain_timeout_s: float,
    specs: Sequence[str] = (),
) -> SwapReport:
    """Warm, shift, drain, retire; see the module docstring."""
    async with pool.swap_lock:
        started = time.monotonic()
        fresh = [pool.new_replica(b, version, capacity, ReplicaState.WARMING) for b in backends]
        try:
            await warm(fresh, health, warm_timeout_s)
        except BaseException:
            await asyncio.gather(*(r.close() for r in fresh))
            raise
        # Shift: no await between here and wake_all, so routing sees one version at a time.
        previous = pool.current_version()
        old = pool.active()
        for replica in old:
            replica.state = ReplicaState.DRAINING
        for replica in fresh:
            replica.state = ReplicaState.ACTIVE
        pool.replicas.extend(fresh)
        pool.version = version
        pool.specs = list(specs)
        pool.wake_all()
        log.info("model %s: traffic shifted %s -> %s", pool.name, previous, version)
        idle = await asyncio.gather(*(r.wait_idle(drain_timeout_s) for r in old))
        drained = all(idle)
        if not drained:
            log.warning("model %s: drain of %s timed out; closing anyway", pool.name, previous)
        await asyncio.gather(*(r.close() for r in old))
        pool.replicas = [r for r in pool.replicas if r.state is not ReplicaState.RETIRED]
        return SwapReport(
            model=pool.name,
            version=version,
            previous_version=previous,
            replicas=tuple(r.id for r in fresh),
            retired=tuple(r.id for r in old),
            swap_s=time.monotonic() - started,
            drained=drained,
        )
