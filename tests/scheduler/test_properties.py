"""Hypothesis properties of the scheduler's state machine.

Random interleavings of submissions, service joins and losses, completions and
failures (retryable or not, current or stale) must keep the invariants:

- a task is never running twice at once (one current attempt per task);
- per-run caps and per-service capacities are never exceeded;
- every submitted task reaches exactly one terminal state;
- no capacity is leaked: with nothing running, every service's in-flight is 0;
- an infrastructure failure never yields a reward;
- a lost agent or env service fails (and cancels) every attempt running on it, and a
  quarantined task is FAILED with ERROR_KIND_INFRA after `quarantine_after` losses.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from megaflow.scheduler import state as s
from megaflow.v1 import common_pb2

INFRA = common_pb2.ERROR_KIND_INFRA


class Model:
    def __init__(self) -> None:
        self.state = s.SchedulerState(s.SchedulerPolicy(default_max_attempts=3))
        self.now = 0.0  # the clock passed with every event (a fallen host is out until later)
        self.running: dict[str, str] = {}  # task_id -> current attempt id
        self.finished: dict[str, int] = {}  # task_id -> times finished
        self.retries: set[str] = set()
        self.stale: list[tuple[str, str]] = []
        self.submitted = 0
        self.caps: dict[str, int] = {}

    def apply(self, event: s.Event) -> None:
        before = {key: svc.in_flight for key, svc in self.state.services.items()}
        for instruction in self.state.handle(event, self.now):
            match instruction:
                case s.Dispatch():
                    assert instruction.task_id not in self.running, "assigned twice"
                    self.running[instruction.task_id] = instruction.attempt_id
                case s.Finish():
                    self.finished[instruction.task_id] = (
                        self.finished.get(instruction.task_id, 0) + 1
                    )
                    r = instruction.result
                    if r.error_kind == INFRA:
                        assert not r.has_reward, "infrastructure failure scored"
                    if r.error.startswith("quarantined:"):
                        assert r.error_kind == INFRA and r.state == common_pb2.TASK_STATE_FAILED
                        assert r.error.count("#") >= self.state.policy.quarantine_after
                case s.ScheduleRetry():
                    self.retries.add(instruction.task_id)
                case s.CancelAttempt():
                    attempt_id = self.running.pop(instruction.task_id)
                    assert attempt_id == instruction.attempt_id
                    self.stale.append((instruction.task_id, attempt_id))
                case s.LateResult():
                    assert instruction.attempt_id != instruction.current_attempt_id
        self.check_caps(before)

    def check_caps(self, before: dict[tuple[int, str], int]) -> None:
        for run_id, run in self.state.runs.items():
            if run.max_concurrency:
                assert run.in_flight <= run.max_concurrency, f"run {run_id} over its cap"
        for key, svc in self.state.services.items():
            gained = svc.in_flight > before.get(key, 0)
            if gained and svc.kind != s.KIND_MODEL:
                # A service may shrink below its load by re-registering; it must then
                # get nothing new until it is back under its capacity.
                assert svc.in_flight <= svc.capacity, f"dispatched onto a full {svc.address}"
            assert svc.in_flight >= 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 6), st.integers(0, 3)),
        st.tuples(
            st.just("join"), st.sampled_from(["a:1", "a:2", "e:1", "e:2"]), st.integers(1, 4)
        ),
        st.tuples(st.just("lose"), st.sampled_from(["a:2", "e:2"]), st.just(0)),
        st.tuples(st.just("complete"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("fail"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("unavailable"), st.integers(0, 50), st.integers(0, 2)),
        st.tuples(st.just("retry_due"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("stale"), st.integers(0, 50), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_invariants_hold_under_any_interleaving(script: list[tuple[str, object, object]]) -> None:
    m = Model()
    m.apply(s.ServiceJoined("m", s.KIND_MODEL, "m:1", 100))
    m.apply(s.ServiceJoined("a", s.KIND_AGENT, "a:1", 3, heartbeats=True))
    m.apply(s.ServiceJoined("e", s.KIND_ENV, "e:1", 3, heartbeats=True))
    for i, (op, x, y) in enumerate(script):
        sid = f"op{i}"
        if op == "submit":
            assert isinstance(x, int) and isinstance(y, int)
            tasks = tuple(
                common_pb2.TaskSpec(task_id=f"t{m.submitted + k}", problem_statement="p")
                for k in range(x)
            )
            m.submitted += x
            m.apply(s.TasksSubmitted(sid, f"r{i}", tasks, max_concurrency=y))
        elif op == "join":
            kind = s.KIND_AGENT if str(x).startswith("a") else s.KIND_ENV
            assert isinstance(y, int)
            m.apply(s.ServiceJoined(sid, kind, str(x), y, heartbeats=True))
        elif op == "lose":
            m.apply(s.ServiceLost(sid, str(x)))
        elif op in ("complete", "fail", "stale", "unavailable") and m.running:
            assert isinstance(x, int)
            task_id = sorted(m.running)[x % len(m.running)]
            attempt_id = m.running[task_id]
            if op == "stale":  # a late duplicate of an attempt that is no longer current
                for old_task, old_attempt in m.stale:
                    m.apply(
                        s.AttemptCompleted(
                            sid,
                            old_task,
                            old_attempt,
                            common_pb2.TaskResult(),
                            common_pb2.Trajectory(),
                        )
                    )
                continue
            del m.running[task_id]
            m.stale.append((task_id, attempt_id))
            if op == "complete":
                result = common_pb2.TaskResult(
                    task_id=task_id, state=common_pb2.TASK_STATE_SUCCEEDED, has_reward=True
                )
                m.apply(
                    s.AttemptCompleted(sid, task_id, attempt_id, result, common_pb2.Trajectory())
                )
            elif op == "unavailable":  # its worker died: set aside until it heartbeats
                worker = ("a:1", "a:2", "e:1")[int(y) % 3]  # type: ignore[call-overload]
                message = f"ServiceUnavailableError: {worker} unreachable: gone"
                m.apply(
                    s.AttemptFailed(
                        sid, task_id, attempt_id, message, True, INFRA, unreachable=(worker,)
                    )
                )
            else:
                m.apply(s.AttemptFailed(sid, task_id, attempt_id, "boom", bool(y), INFRA))
        elif op == "retry_due" and m.retries:
            assert isinstance(x, int)
            task_id = sorted(m.retries)[x % len(m.retries)]
            m.retries.discard(task_id)
            m.apply(s.RetryDue(sid, task_id))
    # Every service set aside heartbeats again (alive after all), past its time out.
    m.now += 3600.0
    for (kind, address), svc in list(m.state.suspect.items()):
        m.apply(s.ServiceJoined("back", kind, address, svc.capacity, heartbeats=True))
    m.now += 3600.0  # ...and past the time a host that came back waits before it is used
    m.apply(s.Wake("later"))
    # Drain: complete every running attempt and fire every pending retry until quiet.
    for _ in range(1000):
        if m.running:
            task_id, attempt_id = next(iter(m.running.items()))
            del m.running[task_id]
            result = common_pb2.TaskResult(task_id=task_id, state=common_pb2.TASK_STATE_SUCCEEDED)
            m.apply(
                s.AttemptCompleted("drain", task_id, attempt_id, result, common_pb2.Trajectory())
            )
        elif m.retries:
            m.apply(s.RetryDue("drain", m.retries.pop()))
        else:
            break
    if m.submitted and not any(svc.kind == s.KIND_AGENT for svc in m.state.services.values()):
        return  # every agent was lost: pending tasks wait for one to join (checked below otherwise)
    if not any(svc.kind == s.KIND_ENV for svc in m.state.services.values()):
        return
    assert set(m.finished) == {f"t{k}" for k in range(m.submitted)}, "a task never finished"
    assert all(count == 1 for count in m.finished.values()), "a task finished twice"
    assert all(svc.in_flight == 0 for svc in m.state.services.values()), "capacity leaked"
