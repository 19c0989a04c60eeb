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
- Each attempt of a task that ended with the loss of its worker counts towards
  quarantine: after `SchedulerPolicy.quarantine_after` such losses *in a row without
  progress* the task is finished as FAILED with `ERROR_KIND_INFRA`, no reward, and the
  causes. Progress: a retry resumes from a later checkpoint than the one before it
  (`AttemptResumed`), so the attempt that ended in the last loss got further; the
  losses before it are forgiven. A task that crashes its worker does so at the same
  point every time and never gets further; one that merely stood near workers that
  died (a node lost, a process killed under a thousand loops) moves on between
  losses, and a dense run of such losses must not fail it.

Pure functions over `SchedulerState`; no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaflow.scheduler.events import AttemptFailed, CancelAttempt, Instruction, ServiceLost
from megaflow.scheduler.placement import KIND_AGENT, KIND_ENV, Service
from megaflow.v1 import common_pb2

if TYPE_CHECKING:
    from megaflow.scheduler.state import SchedulerState, _Task

_KIND_NAMES = {KIND_AGENT: "agent", KIND_ENV: "env"}


def lose_service(state: SchedulerState, event: ServiceLost) -> list[Instruction]:
    """Drop the service at `event.address` and fail the attempts running on it."""
    lost: list[Service] = []
    for kind, placed in state._kinds.items():
        svc = placed.pop(event.address, None) or state.suspect.pop((kind, event.address), None)
        if svc is not None:
            del state.services[(kind, event.address)]
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
        )
        out += state._failed(failed)
    return out


def unreachable_worker(
    state: SchedulerState, placement: tuple[Service, ...], unreachable: tuple[str, ...]
) -> bool:
    """Whether the attempt's agent or env service is among the `unreachable` addresses.
    Any of the attempt's services found unreachable (model replicas too) leaves
    placement until it heartbeats again (a dead process never does; the watchdog then
    drops it)."""
    found = False
    for svc in placement:
        if not svc.address or svc.address not in unreachable:
            continue
        found = found or svc.kind in _KIND_NAMES
        placed = state._kinds[svc.kind]
        if svc.heartbeats and placed.get(svc.address) is svc:
            del placed[svc.address]
            state.suspect[(svc.kind, svc.address)] = svc
    return found


def resumed(task: _Task, seq: int) -> None:
    """An attempt of `task` resumes from checkpoint `seq`: if the task got further than
    the last resumption, only the latest loss (the attempt that got further and then
    lost its worker) still counts towards quarantine."""
    if seq > task.progress:
        task.progress = seq
        task.losses = task.losses[-1:]


def quarantine_result(task: _Task, event: AttemptFailed) -> common_pb2.TaskResult:
    causes = "; ".join(task.losses)
    return common_pb2.TaskResult(
        task_id=task.spec.task_id,
        attempt_id=event.attempt_id,
        state=common_pb2.TASK_STATE_FAILED,
        has_reward=False,
        error_kind=common_pb2.ERROR_KIND_INFRA,
        error=(
            f"quarantined: its attempts ended with the loss of its worker "
            f"{len(task.losses)} times: {causes}"
        ),
        attempts=task.attempt,
        error_type=event.error_type,
    )
