"""Events into and instructions out of the scheduler's state machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from megaflow.v1 import common_pb2, scheduler_pb2

ServiceKind: TypeAlias = scheduler_pb2.ServiceKind.ValueType


# -- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TasksSubmitted:
    stimulus_id: str
    run_id: str
    tasks: tuple[common_pb2.TaskSpec, ...]
    max_concurrency: int = 0
    # Attempts each task already used (a restarted scheduler re-queues unfinished tasks
    # from the ledger); empty = none. The next attempt of task i is `attempts[i] + 1`.
    attempts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ServiceJoined:
    """A service registered (or re-registered: its capacity and resources are updated)."""

    stimulus_id: str
    kind: ServiceKind
    address: str
    capacity: int
    resources: scheduler_pb2.HostResources | None = None
    # Registered over the network with heartbeats (False: an in-process service). Only
    # such a service is set aside ("suspect") after an attempt lost contact with it.
    heartbeats: bool = False


@dataclass(frozen=True)
class ServiceLost:
    """A service stopped heartbeating: it leaves placement, and the attempts running on it
    (agent or env) fail as infrastructure failures that count towards quarantine."""

    stimulus_id: str
    address: str
    reason: str = "no heartbeat"


@dataclass(frozen=True)
class AttemptCompleted:
    """The agent returned a result (scored, or failed for the task's own reason)."""

    stimulus_id: str
    task_id: str
    attempt_id: str
    result: common_pb2.TaskResult
    trajectory: common_pb2.Trajectory


@dataclass(frozen=True)
class AttemptFailed:
    """The attempt raised: the platform failed (retryable) or the request was bad."""

    stimulus_id: str
    task_id: str
    attempt_id: str
    message: str
    retryable: bool
    error_kind: common_pb2.ErrorKind.ValueType
    # The attempt ended with the loss of its worker (agent or env service unreachable).
    # An unreachable agent or env service (`unreachable`) counts as such a loss too.
    worker_lost: bool = False
    # The MegaFlow error class that ended the attempt (e.g. "SandboxError"); "" = none.
    error_type: str = ""
    # The services the error found unreachable (`ServiceUnavailableError.address`).
    unreachable: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttemptResumed:
    """The attempt starts from its task's checkpoint number `seq` (the shell read it
    from the store before sending the attempt): how far the task had got."""

    stimulus_id: str
    task_id: str
    attempt_id: str
    seq: int


@dataclass(frozen=True)
class RetryDue:
    stimulus_id: str
    task_id: str


@dataclass(frozen=True)
class Wake:
    """The time a `WakeAt` asked for has come (a rate limit may admit again)."""

    stimulus_id: str


Event = (
    TasksSubmitted
    | ServiceJoined
    | ServiceLost
    | AttemptCompleted
    | AttemptFailed
    | AttemptResumed
    | RetryDue
    | Wake
)


# -- instructions -----------------------------------------------------------------------
@dataclass(frozen=True)
class Dispatch:
    run_id: str
    task_id: str
    attempt: int
    attempt_id: str
    agent: str
    env: str
    model: str


@dataclass(frozen=True)
class ScheduleRetry:
    run_id: str
    task_id: str
    attempt: int
    delay_s: float
    message: str


@dataclass(frozen=True)
class Finish:
    run_id: str
    task_id: str
    result: common_pb2.TaskResult
    trajectory: common_pb2.Trajectory | None


@dataclass(frozen=True)
class RunFinished:
    run_id: str


@dataclass(frozen=True)
class WakeAt:
    """Feed a `Wake` event after `delay_s` seconds (a rate-limited task waits for a token)."""

    delay_s: float


@dataclass(frozen=True)
class CancelAttempt:
    """Stop the pending RunTask call of an attempt the scheduler has already failed (its
    agent or env service was lost): the caller going away stops the agent loop."""

    task_id: str
    attempt_id: str


@dataclass(frozen=True)
class LateResult:
    """An outcome from an attempt that is no longer current was discarded: log it."""

    task_id: str
    attempt_id: str
    current_attempt_id: str  # '' when the task is terminal or pending
    what: str  # "result" or "failure"


Instruction = Dispatch | ScheduleRetry | Finish | RunFinished | WakeAt | CancelAttempt | LateResult
