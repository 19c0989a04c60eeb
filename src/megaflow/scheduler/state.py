"""The scheduler's pure state machine: events in, instructions out.

No I/O happens here. `SchedulerState.handle(event, now)` updates the state and returns
the instructions the shell (`megaflow.scheduler.service`) must carry out, so the policy
is tested without a network: `assert state.handle(event) == [Dispatch(...)]`. Time only
enters through `now` (the shell passes its monotonic clock; without it time stands
still), so the machine stays deterministic.

Admission (`megaflow.scheduler.queue`): tasks wait in per-class heaps ordered by higher
priority, then earliest deadline (`deadline_s` after submit), then submission order.
Hard, atomic caps count an attempt from the moment it is dispatched (while its sandbox
is still starting) until its outcome is handled: each run's `max_concurrency`, each
user's quota, each named resource pool, each model's in-flight limit and dispatch rate,
each agent and environment service's capacity, and each environment host's advertised
CPU, memory and GPUs (`megaflow.scheduler.placement`, which also does level-1 packing).

Retries: an attempt that fails for an infrastructure reason is retried with exponential
backoff up to the task's `max_attempts`; then the task fails with `ERROR_KIND_INFRA`
and no reward. An outcome from an attempt that is no longer current is discarded and
reported (`LateResult`, counted in `late_results`).

Failures of workers (`megaflow.scheduler.failures`): a lost agent or env service fails
the attempts running on it at once (`CancelAttempt` + retry); an attempt that lost
contact with its worker sets that worker aside until its next heartbeat; a task whose
attempts ended with the loss of their worker `quarantine_after` times is quarantined.
Terminal tasks leave `tasks` (memory stays bounded; `counts()` keeps their number).
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass

from megaflow.scheduler import failures
from megaflow.scheduler.events import (
    AttemptCompleted,
    AttemptFailed,
    AttemptResumed,
    CancelAttempt,
    Dispatch,
    Event,
    Finish,
    Instruction,
    LateResult,
    RetryDue,
    RunFinished,
    ScheduleRetry,
    ServiceJoined,
    ServiceKind,
    ServiceLost,
    TasksSubmitted,
    Wake,
    WakeAt,
)
from megaflow.scheduler.placement import (
    KIND_AGENT,
    KIND_ENV,
    KIND_MODEL,
    Service,
    pick_agent,
    pick_env,
    pick_model,
)
from megaflow.scheduler.policy import SchedulerPolicy
from megaflow.scheduler.queue import AdmissionQueue, OrderKey
from megaflow.scheduler.resources import Need, Offer, unmet
from megaflow.scheduler.snapshot import Snapshot, take_snapshot
from megaflow.v1 import common_pb2

__all__ = [
    "KIND_AGENT",
    "KIND_ENV",
    "KIND_MODEL",
    "AttemptCompleted",
    "AttemptFailed",
    "AttemptResumed",
    "CancelAttempt",
    "Dispatch",
    "Event",
    "Finish",
    "Instruction",
    "LateResult",
    "RetryDue",
    "RunFinished",
    "ScheduleRetry",
    "SchedulerPolicy",
    "SchedulerState",
    "ServiceJoined",
    "ServiceKind",
    "ServiceLost",
    "TasksSubmitted",
    "Wake",
    "WakeAt",
]

HOSTS: Hashable = ("hosts",)  # blocker: no agent, env host or model service can take it now
INF = float("inf")


@dataclass
class _Task:
    spec: common_pb2.TaskSpec
    run_id: str
    max_attempts: int
    need: Need
    order: OrderKey
    state: int = common_pb2.TASK_STATE_PENDING
    attempt: int = 0
    attempt_id: str = ""
    # The services (this incarnation of each) the current attempt holds capacity on:
    # (agent, env, model) while it runs, () otherwise.
    placement: tuple[Service, ...] = ()
    ready_at: float = 0.0
    class_key: Hashable = None
    # (host, cause) of the attempts that ended with their worker lost
    losses: tuple[tuple[str, str], ...] = ()
    outages: int = 0  # attempts lost to an outage, not counted towards max_attempts
    progress: int = 0  # the latest checkpoint number an attempt resumed from


@dataclass
class _Run:
    max_concurrency: int
    in_flight: int = 0
    remaining: int = 0
    queued: int = 0


@dataclass
class _Bucket:
    tokens: float
    at: float


class SchedulerState:
    def __init__(self, policy: SchedulerPolicy | None = None) -> None:
        self.policy = policy or SchedulerPolicy()
        self.tasks: dict[str, _Task] = {}
        self.runs: dict[str, _Run] = {}
        self.services: dict[tuple[ServiceKind, str], Service] = {}
        self.now = 0.0
        self.queue = AdmissionQueue()
        self.user_in_flight: dict[str, int] = {}
        self.user_queued: dict[str, int] = {}
        self.pool_in_flight: dict[str, int] = {}
        self.model_in_flight: dict[str, int] = {}
        self._kinds: dict[ServiceKind, dict[str, Service]] = {
            KIND_MODEL: {},
            KIND_AGENT: {},
            KIND_ENV: {},
        }
        self._seq = 0
        self._queued_since: OrderedDict[str, float] = OrderedDict()
        self._waits: deque[float] = deque(maxlen=self.policy.wait_samples)
        self._buckets: dict[str, _Bucket] = {}
        self._rate_ready_at: dict[str, float] = {}  # rate-blocked model -> next token
        self._wake_pending = INF
        self._rng = random.Random(self.policy.seed)
        # Services an attempt lost contact with, out of placement until they heartbeat.
        self.suspect: dict[tuple[ServiceKind, str], Service] = {}
        # Services that fell, until one of their attempts completes (`failures.Down`),
        # and those back in `suspect` waiting for their time out to end.
        self.down: dict[tuple[ServiceKind, str], failures.Down] = {}
        self.rejoin_at: dict[tuple[ServiceKind, str], float] = {}
        self.jitter = random.Random(self.policy.seed + 1)
        self.terminal: dict[int, int] = {}  # state -> tasks finished (gone from `tasks`)
        self.late_results = 0  # outcomes of attempts no longer current, discarded
        self.services_lost = 0
        self.quarantined = 0

    # -- queries used by the shell and by tests -------------------------------------------
    def counts(self) -> dict[int, int]:
        out = dict(self.terminal)
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

    def env_hosts(self) -> list[Service]:
        return list(self._kinds[KIND_ENV].values())

    def rejection(self, spec: common_pb2.TaskSpec) -> str | None:
        """Why `spec` can never be admitted with the policy and hosts known now, or None.

        With no environment host registered yet, requirements are not judged: the task
        waits for a host that can hold it.
        """
        if spec.pool and spec.pool not in self.policy.pools:
            known = ", ".join(sorted(self.policy.pools)) or "none"
            return f"names resource pool {spec.pool!r}, which the policy lacks (pools: {known})"
        envs = self._kinds[KIND_ENV].values()
        if not envs:
            return None
        need = Need.of(spec)
        reasons = [(env.address or "in-process", unmet(need, env.offer)) for env in envs]
        if all(reason for _, reason in reasons):
            hosts = "; ".join(f"{address} lacks {reason}" for address, reason in reasons[:3])
            more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
            return f"can never fit on any environment host: needs {hosts}{more}"
        return None

    def snapshot(self) -> Snapshot:
        return take_snapshot(self)

    def oldest_queued_at(self) -> float | None:
        return next(iter(self._queued_since.values()), None)

    def recent_waits(self) -> list[float]:
        return list(self._waits)

    # -- transitions --------------------------------------------------------------------
    def handle(self, event: Event, now: float | None = None) -> list[Instruction]:
        if now is not None and now > self.now:
            self.now = now
        if self.now >= self._wake_pending:
            self._wake_pending = INF
        if self._rate_ready_at:
            for model, at in list(self._rate_ready_at.items()):
                if at <= self.now:
                    del self._rate_ready_at[model]
                    self.queue.unblock(("rate", model))
        if self.rejoin_at and failures.restore_due(self):
            self.queue.unblock(HOSTS)
        out: list[Instruction] = []
        match event:
            case TasksSubmitted():
                self._submit(event)
            case ServiceJoined():
                self._join(event)
            case ServiceLost():
                out += failures.lose_service(self, event)
            case AttemptCompleted():
                if self.is_current(event.task_id, event.attempt_id):
                    task = self.tasks[event.task_id]
                    result = common_pb2.TaskResult()
                    result.CopyFrom(event.result)
                    result.attempts = task.attempt
                    failures.survived(self, task.placement)
                    self._release(task)
                    out += self._finish(task, result, event.trajectory)
                else:
                    out.append(self._late(event.task_id, event.attempt_id, "result"))
            case AttemptFailed():
                if self.is_current(event.task_id, event.attempt_id):
                    out += self._failed(event)
                else:
                    out.append(self._late(event.task_id, event.attempt_id, "failure"))
            case AttemptResumed():
                if self.is_current(event.task_id, event.attempt_id):
                    failures.resumed(self.tasks[event.task_id], event.seq)
            case RetryDue():
                due = self.tasks.get(event.task_id)
                if due is not None and due.state == common_pb2.TASK_STATE_PENDING:
                    self._enqueue(due)
            case Wake():
                self._wake_pending = INF  # the outstanding wake fired; ask again if need be
        out += self._schedule()
        wake = min(self._rate_ready_at.values()) if self._rate_ready_at else INF
        if self.rejoin_at:
            wake = min(wake, *self.rejoin_at.values())
        if wake < self._wake_pending:
            self._wake_pending = wake
            out.append(WakeAt(max(wake - self.now, 0.0)))
        return out

    def _late(self, task_id: str, attempt_id: str, what: str) -> LateResult:
        self.late_results += 1
        task = self.tasks.get(task_id)
        current = ""
        if task is not None and task.state == common_pb2.TASK_STATE_RUNNING:
            current = task.attempt_id
        return LateResult(task_id, attempt_id, current, what)

    def _submit(self, event: TasksSubmitted) -> None:
        run = self.runs.setdefault(event.run_id, _Run(event.max_concurrency))
        attempts = event.attempts
        for i, spec in enumerate(event.tasks):
            self._seq += 1
            deadline = self.now + spec.deadline_s if spec.deadline_s > 0 else INF
            task = _Task(
                spec=spec,
                run_id=event.run_id,
                max_attempts=spec.max_attempts or self.policy.default_max_attempts,
                need=Need.of(spec),
                order=(-spec.priority, deadline, self._seq),
                attempt=attempts[i] if attempts else 0,
            )
            task.class_key = (event.run_id, spec.user, spec.pool, spec.model, task.need, spec.image)
            self.tasks[spec.task_id] = task
            run.remaining += 1
            self._enqueue(task)

    def _join(self, event: ServiceJoined) -> None:
        key = (event.kind, event.address)
        svc = self._kinds[event.kind].get(event.address) or self.suspect.get(key)
        if svc is not None:
            svc.update(
                event.capacity, None if event.resources is None else Offer.of(event.resources)
            )
        else:
            svc = Service(event.kind, event.address, event.capacity, Offer.of(event.resources))
            svc.heartbeats = event.heartbeats
            self.services[key] = svc
        failures.joined(self, svc)  # alive: back into placement, unless still down
        self.queue.unblock(HOSTS)

    def _failed(self, event: AttemptFailed) -> list[Instruction]:
        task, policy = self.tasks[event.task_id], self.policy
        down = failures.set_aside(self, task.placement, event.unreachable)
        worker = failures.lost_worker(down)
        if worker is not None or event.worker_lost:
            host = worker.address if worker is not None else event.attempt_id
            task.losses += ((host, f"{event.attempt_id}: {event.message[:300]}"),)
            if failures.poisoned(task, policy.quarantine_after):
                self._release(task)
                self.quarantined += 1
                return self._finish(task, failures.quarantine_result(task, event), None)
        self._release(task)
        outage = bool(down or event.worker_lost) and task.outages < policy.max_outage_retries
        if outage:  # not the task's fault: it waits for a host, its attempts are kept
            task.outages += 1
        if event.retryable and task.attempt - task.outages < task.max_attempts:
            task.state = common_pb2.TASK_STATE_PENDING
            n = 0 if outage else task.attempt - task.outages - 1
            delay = min(policy.retry_base_s * 2**n, policy.retry_max_s)
            return [ScheduleRetry(task.run_id, event.task_id, task.attempt, delay, event.message)]
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
            error_type=event.error_type,
        )
        return self._finish(task, result, None)

    def _enqueue(self, task: _Task) -> None:
        task.ready_at = self.now
        self._queued_since[task.spec.task_id] = self.now
        self.runs[task.run_id].queued += 1
        user = task.spec.user
        self.user_queued[user] = self.user_queued.get(user, 0) + 1
        self.queue.push(task.class_key, task.order, task.spec.task_id)

    def _release(self, task: _Task) -> None:
        """Give back everything the current attempt holds (called once per attempt)."""
        spec = task.spec
        self.runs[task.run_id].in_flight -= 1
        self.user_in_flight[spec.user] -= 1
        if not self.user_in_flight[spec.user]:
            del self.user_in_flight[spec.user]
        if spec.pool:
            self.pool_in_flight[spec.pool] -= 1
        self.model_in_flight[spec.model] -= 1
        agent, env, model = task.placement  # a lost service's object is gone from the map
        agent.release_unit()
        env.release(task.need, spec.image)
        model.release_unit()
        task.placement = ()
        if self.queue.blocked:
            for blocker in (
                ("run", task.run_id),
                ("user", spec.user),
                ("pool", spec.pool),
                ("model", spec.model),
                HOSTS,
            ):
                self.queue.unblock(blocker)

    def _finish(
        self, task: _Task, result: common_pb2.TaskResult, trajectory: common_pb2.Trajectory | None
    ) -> list[Instruction]:
        task.state = result.state
        del self.tasks[task.spec.task_id]  # memory stays bounded; the ledger keeps it
        self.terminal[result.state] = self.terminal.get(result.state, 0) + 1
        run = self.runs[task.run_id]
        run.remaining -= 1
        out: list[Instruction] = [Finish(task.run_id, task.spec.task_id, result, trajectory)]
        if run.remaining == 0:
            out.append(RunFinished(task.run_id))
        return out

    # -- admission and placement ----------------------------------------------------------
    def _blocker(self, task: _Task) -> Hashable | None:
        """What stops `task` from being admitted now, apart from host capacity."""
        spec, policy = task.spec, self.policy
        run = self.runs[task.run_id]
        if run.max_concurrency and run.in_flight >= run.max_concurrency:
            return ("run", task.run_id)
        quota = policy.user_max_in_flight.get(spec.user, policy.default_user_max_in_flight)
        if quota and self.user_in_flight.get(spec.user, 0) >= quota:
            return ("user", spec.user)
        limit = policy.pools.get(spec.pool, 0) if spec.pool else 0
        if limit and self.pool_in_flight.get(spec.pool, 0) >= limit:
            return ("pool", spec.pool)
        limit = policy.model_max_in_flight.get(spec.model, 0)
        if limit and self.model_in_flight.get(spec.model, 0) >= limit:
            return ("model", spec.model)
        rate = policy.model_dispatch_rate.get(spec.model, 0.0)
        if rate > 0:
            bucket = self._bucket(spec.model, rate)
            if bucket.tokens < 1.0:
                self._rate_ready_at[spec.model] = self.now + (1.0 - bucket.tokens) / rate
                return ("rate", spec.model)
        return None

    def _bucket(self, model: str, rate: float) -> _Bucket:
        burst = max(1.0, rate)
        bucket = self._buckets.get(model)
        if bucket is None:
            bucket = self._buckets[model] = _Bucket(burst, self.now)
        bucket.tokens = min(burst, bucket.tokens + (self.now - bucket.at) * rate)
        bucket.at = self.now
        return bucket

    def _place(self, task: _Task) -> tuple[Service, Service, Service] | None:
        strategy = self.policy.placement
        env = pick_env(
            self._kinds[KIND_ENV].values(), task.need, task.spec.image, strategy, self._rng
        )
        if env is None:
            return None
        near = env.node if strategy == "packing" else None
        agent = pick_agent(self._kinds[KIND_AGENT].values(), near)
        model = pick_model(self._kinds[KIND_MODEL].values())
        if agent is None or model is None:
            return None
        return agent, env, model

    def _schedule(self) -> list[Instruction]:
        out: list[Instruction] = []
        queue = self.queue
        cls = queue.pop_ready()
        while cls is not None:
            task = self.tasks[cls.head()[1]]
            blocker = self._blocker(task)
            placement = None if blocker is not None else self._place(task)
            if placement is None:
                queue.block(cls, blocker if blocker is not None else HOSTS)
                cls = queue.pop_ready()
                continue
            out.append(self._dispatch(task, placement))
            if not queue.take_and_keep(cls):  # its next task is not the best any more
                cls = queue.pop_ready()
        return out

    def _dispatch(self, task: _Task, placement: tuple[Service, Service, Service]) -> Dispatch:
        spec = task.spec
        agent, env, model = placement
        del self._queued_since[spec.task_id]
        self._waits.append(self.now - task.ready_at)
        run = self.runs[task.run_id]
        run.queued -= 1
        run.in_flight += 1
        self.user_queued[spec.user] -= 1
        if not self.user_queued[spec.user]:
            del self.user_queued[spec.user]
        self.user_in_flight[spec.user] = self.user_in_flight.get(spec.user, 0) + 1
        if spec.pool:
            self.pool_in_flight[spec.pool] = self.pool_in_flight.get(spec.pool, 0) + 1
        self.model_in_flight[spec.model] = self.model_in_flight.get(spec.model, 0) + 1
        rate = self.policy.model_dispatch_rate.get(spec.model, 0.0)
        if rate > 0:
            self._buckets[spec.model].tokens -= 1.0
        agent.hold_unit()
        env.hold(task.need, spec.image)
        model.hold_unit()
        task.placement = placement
        task.attempt += 1
        task.attempt_id = f"{spec.task_id}#{task.attempt}"
        task.state = common_pb2.TASK_STATE_RUNNING
        return Dispatch(
            task.run_id,
            spec.task_id,
            task.attempt,
            task.attempt_id,
            agent.address,
            env.address,
            model.address,
        )
