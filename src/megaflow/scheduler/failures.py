"""How the scheduler's state machine handles lost workers and poison tasks.

- A service that stopped heartbeating (`ServiceLost`) leaves placement; every attempt
  running on it (as its agent or its environment host) is failed at once as an
  infrastructure failure (retryable), and the shell is told to cancel its pending
  RunTask call (`CancelAttempt`). A lost model service only leaves placement: its
  attempts' model calls fail (and are retried) inside the agent.
- An attempt that failed because one of its services was unreachable (a
  `ServiceUnavailableError` whose `address` is that service's: the agent's RunTask
  call, or the agent's calls to its env or its model replica; the address crosses
  the wire with the error, never parsed from its message) sets that service
  aside ("suspect") until its next heartbeat, so a retry does not go straight back to a
  dead process: the watchdog would drop it only two heartbeat intervals later, and
  every attempt placed on it meanwhile would fail at once. An unreachable model
  replica is not the task's worker: it is set aside but does not count towards
  quarantine.
- A service found down (set aside, or lost) is *down*: it stays out of placement until
  it re-registers and then for `SchedulerPolicy.host_rejoin_s` more (its clients'
  channels wait out gRPC's reconnect backoff), and at least
  `host_backoff_base_s * 2**(falls - 1)` (jittered, at most `host_backoff_max_s`) after
  its fall, `falls` counting its falls in a row; an attempt completed on it resets the
  count. So a host that dies and comes back at the same address is not dispatched to
  while it is dead, nor the moment it re-registers, nor again and again if it flaps.
- An attempt lost to an outage (one of its services unreachable or lost) does not count
  towards the task's `max_attempts` (up to `max_outage_retries` per task) and is retried
  after `retry_base_s`, not a doubling backoff: the task waits in the queue until a host
  is up instead of burning its attempts while none is.
- Poison tasks: each attempt that ended with the loss of its worker (agent or env) is
  recorded with the worker's address; the task is quarantined (FAILED,
  `ERROR_KIND_INFRA`, no reward, the causes) after `quarantine_after` such losses *in a
  row without progress* **on at least two different hosts**. A task that kills its
  worker does so wherever it goes, so it soon loses attempts on several hosts; losses
  all on one host are that host's deaths (a lone env host killed twice must not
  quarantine the tasks that were on it), and such a task is bounded by
  `max_outage_retries` + `max_attempts` instead. Progress: a retry resumes from a later
  checkpoint than the one before it (`AttemptResumed`), so the attempt that ended in
  the last loss got further; the losses before it are forgiven.

Pure functions over `SchedulerState`; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megaflow.scheduler.events import AttemptFailed, CancelAttempt, Instruction, ServiceLost
from megaflow.scheduler.placement import KIND_AGENT, KIND_ENV, Service
from megaflow.v1 import common_pb2

if TYPE_CHECKING:
    from megaflow.scheduler.state import SchedulerState, _Task

_KIND_NAMES = {KIND_AGENT: "agent", KIND_ENV: "env"}


@dataclass
class Down:
    """A service that fell (unreachable or lost) and has not yet completed an attempt."""

    falls: int = 0  # in a row
    until: float = 0.0  # not placed before this moment (`SchedulerState.now`)
    back: bool = False  # re-registered since its last fall


def fall(state: SchedulerState, svc: Service) -> None:
    """`svc` went down now (once per fall: callers check that it was placeable)."""
    key = (svc.kind, svc.address)
    down = state.down.setdefault(key, Down())
    down.falls += 1
    down.back = False
    policy = state.policy
    backoff = min(policy.host_backoff_base_s * 2 ** (down.falls - 1), policy.host_backoff_max_s)
    down.until = state.now + backoff * state.jitter.uniform(0.5, 1.0)
    state.rejoin_at.pop(key, None)


def joined(state: SchedulerState, svc: Service) -> None:
    """`svc` registered or heartbeated: placeable again unless it is down."""
    key = (svc.kind, svc.address)
    placed = state._kinds[svc.kind]
    down = state.down.get(key)
    if down is not None and not down.back:  # back after a fall: let its clients reconnect
        down.back = True
        down.until = max(down.until, state.now + state.policy.host_rejoin_s)
    if down is not None and down.until > state.now:
        placed.pop(svc.address, None)
        state.suspect[key] = svc
        state.rejoin_at[key] = down.until
        return
    state.suspect.pop(key, None)
    state.rejoin_at.pop(key, None)
    placed[svc.address] = svc


def restore_due(state: SchedulerState) -> bool:
    """Put back the services whose time out of placement is over; whether any came back."""
    back = False
    for key, at in list(state.rejoin_at.items()):
        if at <= state.now:
            del state.rejoin_at[key]
            svc = state.suspect.pop(key, None)
            if svc is not None:
                state._kinds[key[0]][key[1]] = svc
                back = True
    return back


def survived(state: SchedulerState, placement: tuple[Service, ...]) -> None:
    """An attempt completed on `placement`: its services are well again."""
    if state.down:
        for svc in placement:
            down = state.down.get((svc.kind, svc.address))
            if down is not None and down.back and down.until <= state.now:
                del state.down[(svc.kind, svc.address)]


def lose_service(state: SchedulerState, event: ServiceLost) -> list[Instruction]:
    """Drop the service at `event.address` and fail the attempts running on it."""
    lost: list[Service] = []
    for kind, placed in state._kinds.items():
        svc = placed.pop(event.address, None)
        if svc is not None:
            fall(state, svc)  # was placeable: a new fall (a suspect one fell already)
        svc = svc or state.suspect.pop((kind, event.address), None)
        if svc is not None:
            del state.services[(kind, event.address)]
            state.rejoin_at.pop((kind, event.address), None)
            lost.append(svc)
    out: list[Instruction] = []
    workers = [svc for svc in lost if svc.kind in _KIND_NAMES]
    if not workers:
        return out
    state.services_lost += 1
    victims = [
        task
        for task in state.tasks.values()
        if task.placement and any(svc in task.placement for svc in workers)
    ]
    for task in victims:
        svc = next(svc for svc in workers if svc in task.placement)
        out.append(CancelAttempt(task.spec.task_id, task.attempt_id))
        failed = AttemptFailed(
            event.stimulus_id,
            task.spec.task_id,
            task.attempt_id,
            f"{_KIND_NAMES[svc.kind]} service {svc.address} lost ({event.reason})",
            True,
            common_pb2.ERROR_KIND_INFRA,
            worker_lost=True,
            unreachable=(svc.address,),
        )
        out += state._failed(failed)
    return out


def set_aside(
    state: SchedulerState, placement: tuple[Service, ...], unreachable: tuple[str, ...]
) -> tuple[Service, ...]:
    """The attempt's services among the `unreachable` addresses. Each one still in
    placement leaves it (a fall, see `fall`) until it heartbeats again and its time out
    is over (a dead process never heartbeats; the watchdog then drops it)."""
    found: list[Service] = []
    for svc in placement:
        if not svc.address or svc.address not in unreachable:
            continue
        found.append(svc)
        placed = state._kinds[svc.kind]
        if svc.heartbeats and placed.get(svc.address) is svc:
            del placed[svc.address]
            state.suspect[(svc.kind, svc.address)] = svc
            fall(state, svc)
    return tuple(found)


def lost_worker(lost: tuple[Service, ...]) -> Service | None:
    """The agent or env service among the attempt's `lost` ones (model replicas are not
    the task's worker: they do not count towards quarantine)."""
    return next((svc for svc in lost if svc.kind in _KIND_NAMES), None)


def poisoned(task: _Task, limit: int) -> bool:
    """Whether `task` lost its worker `limit` times (without progress), on at least two
    different hosts (one, where `limit` is 1)."""
    hosts = {host for host, _ in task.losses}
    return bool(limit) and len(task.losses) >= limit and len(hosts) >= min(2, limit)


def resumed(task: _Task, seq: int) -> None:
    """An attempt of `task` resumes from checkpoint `seq`: if the task got further than
    the last resumption, only the latest loss (the attempt that got further and then
    lost its worker) still counts towards quarantine."""
    if seq > task.progress:
        task.progress = seq
        task.losses = task.losses[-1:]


def quarantine_result(task: _Task, event: AttemptFailed) -> common_pb2.TaskResult:
    causes = "; ".join(cause for _, cause in task.losses)
    return common_pb2.TaskResult(
        task_id=task.spec.task_id,
        attempt_id=event.attempt_id,
        state=common_pb2.TASK_STATE_FAILED,
        has_reward=False,
        error_kind=common_pb2.ERROR_KIND_INFRA,
        error=(
            f"quarantined: its attempts ended with the loss of its worker "
            f"{len(task.losses)} times on "
            f"{len({host for host, _ in task.losses})} hosts: {causes}"
        ),
        attempts=task.attempt,
        error_type=event.error_type,
    )
