"""Queue figures of the scheduler for `megaflow status`: depth, waits, pool usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megaflow.scheduler.state import SchedulerState


@dataclass
class Snapshot:
    queued: int
    runs: dict[str, tuple[int, int]]  # run id -> (queued, in flight), unfinished runs
    users: dict[str, tuple[int, int]]  # user -> (queued, in flight)
    oldest_wait_s: float  # of the task queued longest
    waits: list[float]  # queue waits of the latest dispatches
    pools: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in flight, limit)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, nearest rank; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def take_snapshot(state: SchedulerState) -> Snapshot:
    policy = state.policy
    pools = {
        f"pool:{name}": (state.pool_in_flight.get(name, 0), limit)
        for name, limit in policy.pools.items()
    }
    for name, n in state.model_in_flight.items():
        limit = policy.model_max_in_flight.get(name, 0)
        if n or limit:
            pools[f"model:{name}"] = (n, limit)
    users = set(state.user_queued) | set(state.user_in_flight)
    oldest = state.oldest_queued_at()
    return Snapshot(
        queued=len(state.queue),
        runs={rid: (run.queued, run.in_flight) for rid, run in state.runs.items() if run.remaining},
        users={u: (state.user_queued.get(u, 0), state.user_in_flight.get(u, 0)) for u in users},
        oldest_wait_s=0.0 if oldest is None else state.now - oldest,
        waits=state.recent_waits(),
        pools=pools,
    )
