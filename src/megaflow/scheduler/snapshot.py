"""Queue figures of the scheduler for `megaflow status`: depth, waits, pool usage, and
the `StatusResponse` built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megaflow.v1 import common_pb2, scheduler_pb2

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


def status_response(
    state: SchedulerState, last_seen: dict[str, float], now: float, counters: dict[str, int]
) -> scheduler_pb2.StatusResponse:
    """`megaflow status`: task counts, services (`last_seen`: address -> monotonic time of
    its last heartbeat), queues, waits, pools and the failure-handling `counters`."""
    counts = state.counts()
    snap = take_snapshot(state)
    response = scheduler_pb2.StatusResponse(
        pending=counts.get(common_pb2.TASK_STATE_PENDING, 0),
        running=counts.get(common_pb2.TASK_STATE_RUNNING, 0),
        succeeded=counts.get(common_pb2.TASK_STATE_SUCCEEDED, 0),
        failed=counts.get(common_pb2.TASK_STATE_FAILED, 0),
        services=[
            scheduler_pb2.ServiceStatus(
                kind=svc.kind,
                address=svc.address or "in-process",
                capacity=svc.capacity,
                in_flight=svc.in_flight,
                last_seen_s_ago=now - last_seen.get(svc.address, now),
                dispatched=svc.dispatched,
                resources=svc.offer.to_proto(),
                cpu_millis_used=svc.cpu_millis_used,
                memory_mib_used=svc.memory_mib_used,
                gpus_used=svc.gpus_used,
                warm_placements=svc.warm_placements,
            )
            for svc in state.services.values()
        ],
        queued=snap.queued,
        runs=[
            scheduler_pb2.QueueDepth(key=k, queued=q, in_flight=n)
            for k, (q, n) in snap.runs.items()
        ],
        users=[
            scheduler_pb2.QueueDepth(key=k, queued=q, in_flight=n)
            for k, (q, n) in sorted(snap.users.items())
        ],
        oldest_wait_s=snap.oldest_wait_s,
        wait_p50_s=percentile(snap.waits, 50),
        wait_p99_s=percentile(snap.waits, 99),
        wait_samples=len(snap.waits),
        pools=[
            scheduler_pb2.PoolStatus(name=k, in_flight=n, limit=limit)
            for k, (n, limit) in sorted(snap.pools.items())
        ],
    )
    response.counters.update(counters)
    return response
