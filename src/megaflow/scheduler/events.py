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


@dataclass(frozen=True)
class ServiceJoined:
    """A service registered (or re-registered: its capacity and resources are updated)."""

    stimulus_id: str
    kind: ServiceKind
    address: str
    capacity: int
    resources: scheduler_pb2.HostResources | None = None


@dataclass(frozen=True)
class ServiceLost:
    stimulus_id: str
    address: str


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


Instruction = Dispatch | ScheduleRetry | Finish | RunFinished | WakeAt
