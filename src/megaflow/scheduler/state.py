"""The scheduler's pure state machine: events in, instructions out.

No I/O happens here. `SchedulerState.handle(event)` updates the state and returns the
instructions the shell (`megaflow.scheduler.service`) must carry out, so the policy is
tested without a network: `assert state.handle(event) == [Dispatch(...)]`.

Policy (foundation): FIFO over tasks in submission order; a hard cap on each run's
in-flight tasks; a hard cap per agent and per environment service (their registered
capacity); each attempt goes to the least-loaded agent, environment and model
service. An attempt that fails for an infrastructure reason is retried with
exponential backoff up to the task's `max_attempts`; then the task fails with
`ERROR_KIND_INFRA` and no reward. A result from an attempt that is no longer current
is ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TypeAlias

from megaflow.v1 import common_pb2, scheduler_pb2

ServiceKind: TypeAlias = scheduler_pb2.ServiceKind.ValueType
KIND_MODEL = scheduler_pb2.SERVICE_KIND_MODEL
KIND_AGENT = scheduler_pb2.SERVICE_KIND_AGENT
KIND_ENV = scheduler_pb2.SERVICE_KIND_ENV


# -- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TasksSubmitted:
    stimulus_id: str
    run_id: str
    tasks: tuple[common_pb2.TaskSpec, ...]
    max_concurrency: int = 0


@dataclass(frozen=True)
class ServiceJoined:
    stimulus_id: str
    kind: ServiceKind
    address: str
    capacity: int


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


Event = TasksSubmitted | ServiceJoined | ServiceLost | AttemptCompleted | AttemptFailed | RetryDue


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


Instruction = Dispatch | ScheduleRetry | Finish | RunFinished


# -- state ------------------------------------------------------------------------------
@dataclass
class _Task:
    spec: common_pb2.TaskSpec
    run_id: str
    max_attempts: int
    state: int = common_pb2.TASK_STATE_PENDING
    attempt: int = 0
    attempt_id: str = ""
    # The services (this incarnation of each) the current attempt holds capacity on.
    placement: tuple[_Service, ...] = ()


@dataclass
class _Run:
    max_concurrency: int
    queue: deque[str] = field(default_factory=deque)
    in_flight: int = 0
    remaining: int = 0


@dataclass
class _Service:
    kind: ServiceKind
    address: str
    capacity: int
    in_flight: int = 0
    dispatched: int = 0

    @property
    def load(self) -> float:
        return self.in_flight / max(self.capacity, 1)


@dataclass(frozen=True)
class SchedulerPolicy:
    # 6 attempts 1 s apart, doubling: 1+2+4+8+16 = 31 s of backoff outlast a crashed
    # service's restart (or the 3 missed heartbeats after which it is dropped), even while
    # gRPC's own reconnect backoff (1 s, x1.6) keeps failing calls to the restarted address.
    default_max_attempts: int = 6
    retry_base_s: float = 1.0
    retry_max_s: float = 30.0


class SchedulerState:
    def __init__(self, policy: SchedulerPolicy | None = None) -> None:
        self.policy = policy or SchedulerPolicy()
        self.tasks: dict[str, _Task] = {}
        self.runs: dict[str, _Run] = {}
        self.services: dict[tuple[ServiceKind, str], _Service] = {}

    # -- queries used by the shell and by tests -------------------------------------------
    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for task in self.tasks.values():
            out[task.state] = out.get(task.state, 0) + 1
        return out

    def is_current(self, task_id: str, attempt_id: str) -> bool:
        task = self.tasks.get(task_id)
        return (
            task is not None
            and task.attempt_id == attempt_id
            and task.state == common_pb2.TASK_STATE_RUNNING
        )

    # -- transitions --------------------------------------------------------------------
    def handle(self, event: Event) -> list[Instruction]:
        out: list[Instruction] = []
        match event:
            case TasksSubmitted():
                run = self.runs.setdefault(event.run_id, _Run(event.max_concurrency))
                for spec in event.tasks:
                    self.tasks[spec.task_id] = _Task(
                        spec=spec,
                        run_id=event.run_id,
                        max_attempts=spec.max_attempts or self.policy.default_max_attempts,
                    )
                    run.queue.append(spec.task_id)
                    run.remaining += 1
            case ServiceJoined():
                key = (event.kind, event.address)
                if key in self.services:
                    self.services[key].capacity = event.capacity
                else:
                    self.services[key] = _Service(event.kind, event.address, event.capacity)
            case ServiceLost():
                for lost in [k for k in self.services if k[1] == event.address]:
                    del self.services[lost]
            case AttemptCompleted():
                if self.is_current(event.task_id, event.attempt_id):
                    task = self.tasks[event.task_id]
                    result = common_pb2.TaskResult()
                    result.CopyFrom(event.result)
                    result.attempts = task.attempt
                    self._release(task)
                    out += self._finish(task, result, event.trajectory)
            case AttemptFailed():
                if self.is_current(event.task_id, event.attempt_id):
                    task = self.tasks[event.task_id]
                    self._release(task)
                    if event.retryable and task.attempt < task.max_attempts:
                        task.state = common_pb2.TASK_STATE_PENDING
                        delay = min(
                            self.policy.retry_base_s * 2 ** (task.attempt - 1),
                            self.policy.retry_max_s,
                        )
                        out.append(
                            ScheduleRetry(
                                task.run_id, event.task_id, task.attempt, delay, event.message
                            )
                        )
                    else:
                        exhausted = event.retryable
                        result = common_pb2.TaskResult(
                            task_id=event.task_id,
                            attempt_id=event.attempt_id,
                            state=common_pb2.TASK_STATE_FAILED,
                            has_reward=False,
                            error_kind=event.error_kind,
                            error=(
                                f"gave up after {task.attempt} attempts: {event.message}"
                                if exhausted
                                else event.message
                            ),
                            attempts=task.attempt,
                        )
                        out += self._finish(task, result, None)
            case RetryDue():
                due = self.tasks.get(event.task_id)
                if due is not None and due.state == common_pb2.TASK_STATE_PENDING:
                    self.runs[due.run_id].queue.appendleft(event.task_id)
        out += self._schedule()
        return out

    def _release(self, task: _Task) -> None:
        run = self.runs[task.run_id]
        run.in_flight -= 1
        for service in task.placement:
            service.in_flight -= 1  # a lost service's object is gone from the map: harmless
        task.placement = ()

    def _finish(
        self, task: _Task, result: common_pb2.TaskResult, trajectory: common_pb2.Trajectory | None
    ) -> list[Instruction]:
        task.state = result.state
        run = self.runs[task.run_id]
        run.remaining -= 1
        out: list[Instruction] = [Finish(task.run_id, task.spec.task_id, result, trajectory)]
        if run.remaining == 0:
            out.append(RunFinished(task.run_id))
        return out

    def _pick(self, kind: ServiceKind, *, hard: bool) -> _Service | None:
        best: _Service | None = None
        for service in self.services.values():
            if service.kind != kind or (hard and service.in_flight >= service.capacity):
                continue
            if best is None or service.load < best.load:
                best = service
        return best

    def _schedule(self) -> list[Instruction]:
        out: list[Instruction] = []
        for run_id, run in self.runs.items():
            while run.queue and (run.max_concurrency == 0 or run.in_flight < run.max_concurrency):
                agent = self._pick(KIND_AGENT, hard=True)
                env = self._pick(KIND_ENV, hard=True)
                model = self._pick(KIND_MODEL, hard=False)
                if agent is None or env is None or model is None:
                    return out  # no capacity anywhere: wait for a completion or a new service
                task = self.tasks[run.queue.popleft()]
                task.attempt += 1
                task.attempt_id = f"{task.spec.task_id}#{task.attempt}"
                task.state = common_pb2.TASK_STATE_RUNNING
                task.placement = (agent, env, model)
                for service in (agent, env, model):
                    service.in_flight += 1
                    service.dispatched += 1
                run.in_flight += 1
                out.append(
                    Dispatch(
                        run_id,
                        task.spec.task_id,
                        task.attempt,
                        task.attempt_id,
                        agent.address,
                        env.address,
                        model.address,
                    )
                )
        return out
