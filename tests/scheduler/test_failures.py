"""Lost workers, suspect services, quarantine and recovery in the pure state machine."""

from __future__ import annotations

from megaflow.scheduler import state as s
from megaflow.v1 import common_pb2

INFRA = common_pb2.ERROR_KIND_INFRA
AGENT_GONE = "ServiceUnavailableError: a:1 unreachable: connection refused"
ENV_GONE = "ServiceUnavailableError: e:1 unreachable: Socket closed"
UNAVAILABLE = "ServiceUnavailableError"


def _tasks(*ids: str) -> tuple[common_pb2.TaskSpec, ...]:
    return tuple(common_pb2.TaskSpec(task_id=i, problem_statement="p") for i in ids)


def _state(**policy: object) -> s.SchedulerState:
    st = s.SchedulerState(s.SchedulerPolicy(retry_base_s=1.0, **policy))  # type: ignore[arg-type]
    st.handle(s.ServiceJoined("m", s.KIND_MODEL, "m:1", 100, heartbeats=True))
    st.handle(s.ServiceJoined("e", s.KIND_ENV, "e:1", 10, heartbeats=True))
    st.handle(s.ServiceJoined("a", s.KIND_AGENT, "a:1", 10, heartbeats=True))
    return st


def _kinds(out: list[s.Instruction]) -> list[type]:
    return [type(i) for i in out]


def test_a_lost_agent_fails_and_cancels_its_attempts_which_go_elsewhere() -> None:
    st = _state()
    st.handle(s.ServiceJoined("a2", s.KIND_AGENT, "a:2", 10, heartbeats=True))
    out = st.handle(s.TasksSubmitted("sub", "r", _tasks("t0", "t1")))
    on_a1 = {d.task_id for d in out if isinstance(d, s.Dispatch) and d.agent == "a:1"}
    assert on_a1
    out = st.handle(s.ServiceLost("lost", "a:1", "no heartbeat for 4.1 s"))
    cancels = [i for i in out if isinstance(i, s.CancelAttempt)]
    retries = [i for i in out if isinstance(i, s.ScheduleRetry)]
    assert {c.task_id for c in cancels} == on_a1 == {r.task_id for r in retries}
    assert all(c.attempt_id.endswith("#1") for c in cancels)
    assert "agent service a:1 lost (no heartbeat for 4.1 s)" in retries[0].message
    assert st.services_lost == 1
    for task_id in on_a1:
        (d,) = [i for i in st.handle(s.RetryDue("due", task_id)) if isinstance(i, s.Dispatch)]
        assert (d.agent, d.attempt_id) == ("a:2", f"{task_id}#2")
    # the lost attempts' outcomes, arriving late, are discarded
    late = st.handle(
        s.AttemptCompleted("late", cancels[0].task_id, cancels[0].attempt_id,
                           common_pb2.TaskResult(), common_pb2.Trajectory())
    )  # fmt: skip
    assert _kinds(late) == [s.LateResult]


def test_a_lost_env_host_fails_its_attempts_but_a_lost_model_only_leaves_placement() -> None:
    st = _state()
    st.handle(s.ServiceJoined("m2", s.KIND_MODEL, "m:2", 100, heartbeats=True))
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    assert [i for i in st.handle(s.ServiceLost("l", "m:1")) if not isinstance(i, s.WakeAt)] == []
    assert st.tasks["t0"].state == common_pb2.TASK_STATE_RUNNING
    out = st.handle(s.ServiceLost("l", "e:1"))
    assert _kinds(out) == [s.CancelAttempt, s.ScheduleRetry]
    assert "env service e:1 lost" in out[1].message  # type: ignore[union-attr]
    assert all(svc.in_flight == 0 for svc in st.services.values())


def test_an_unreachable_worker_is_set_aside_until_it_heartbeats_again() -> None:
    st = _state()
    st.handle(s.ServiceJoined("e", s.KIND_ENV, "e:2", 10, heartbeats=True))
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    out = st.handle(
        s.AttemptFailed("f", "t0", "t0#1", AGENT_GONE, True, INFRA, error_type=UNAVAILABLE,
                        unreachable=("a:1",))
    )  # fmt: skip
    assert _kinds(out) == [s.ScheduleRetry]
    assert set(st.suspect) == {(s.KIND_AGENT, "a:1")}  # the one the error names
    # the retry does not go back to the (maybe dead) worker: it waits...
    assert not [i for i in st.handle(s.RetryDue("due", "t0")) if isinstance(i, s.Dispatch)]
    assert st.tasks["t0"].state == common_pb2.TASK_STATE_PENDING
    # ...until its agent heartbeats: alive after all, with its accounting intact
    out = st.handle(s.ServiceJoined("hb", s.KIND_AGENT, "a:1", 10, heartbeats=True))
    assert [i.attempt_id for i in out if isinstance(i, s.Dispatch)] == ["t0#2"]
    assert not st.suspect
    # a silent one is dropped by the watchdog from the suspects too
    st.handle(s.AttemptFailed("f", "t0", "t0#2", AGENT_GONE, True, INFRA, unreachable=("a:1",)))
    st.handle(s.ServiceLost("l", "a:1"))
    assert (s.KIND_AGENT, "a:1") not in st.services and (s.KIND_AGENT, "a:1") not in st.suspect


def test_an_unreachable_model_is_set_aside_but_is_not_the_tasks_worker() -> None:
    st = _state(quarantine_after=1)
    st.handle(s.ServiceJoined("m2", s.KIND_MODEL, "m:2", 100, heartbeats=True))
    out = st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    (d,) = [i for i in out if isinstance(i, s.Dispatch)]
    gone = f"ServiceUnavailableError: {d.model} unreachable: connection refused"
    other = "m:2" if d.model == "m:1" else "m:1"
    out = st.handle(s.AttemptFailed("f", "t0", "t0#1", gone, True, INFRA, unreachable=(d.model,)))
    assert _kinds(out) == [s.ScheduleRetry]  # not quarantined: not its worker
    assert st.tasks["t0"].losses == ()
    assert set(st.suspect) == {(s.KIND_MODEL, d.model)}
    # the retry goes to the other replica, not back to the (maybe dead) one
    (again,) = [i for i in st.handle(s.RetryDue("due", "t0")) if isinstance(i, s.Dispatch)]
    assert again.model == other


def test_in_process_services_are_never_set_aside() -> None:
    st = s.SchedulerState()
    for kind, address in ((s.KIND_MODEL, "m"), (s.KIND_ENV, "e:1"), (s.KIND_AGENT, "a:1")):
        st.handle(s.ServiceJoined("j", kind, address, 10))
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    st.handle(s.AttemptFailed("f", "t0", "t0#1", AGENT_GONE, True, INFRA, unreachable=("a:1",)))
    assert not st.suspect


def test_an_unreachable_service_is_known_by_the_errors_address_not_its_message() -> None:
    st = _state()
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    # a message that merely reads like an unreachable agent sets nothing aside
    st.handle(s.AttemptFailed("f", "t0", "t0#1", AGENT_GONE, True, INFRA))
    assert not st.suspect and st.tasks["t0"].losses == ()


def test_a_task_that_keeps_killing_its_worker_is_quarantined() -> None:
    st = _state(quarantine_after=3, default_max_attempts=10)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("poison", "fine")))
    causes: list[s.Event] = [
        s.ServiceLost("l1", "a:1", "no heartbeat for 4.0 s"),
        s.AttemptFailed("f", "poison", "poison#2", ENV_GONE, True, INFRA, unreachable=("e:1",)),
        s.ServiceLost("l2", "e:1", "no heartbeat for 4.2 s"),
    ]
    out: list[s.Instruction] = []
    for n, event in enumerate(causes, start=1):
        out = st.handle(event)
        if n < 3:
            assert any(isinstance(i, s.ScheduleRetry) and i.task_id == "poison" for i in out)
            # the worker comes back (a supervisor restarted it), the task goes again
            st.handle(s.ServiceJoined("back", s.KIND_AGENT, "a:1", 10, heartbeats=True))
            st.handle(s.ServiceJoined("back", s.KIND_ENV, "e:1", 10, heartbeats=True))
            st.handle(s.RetryDue("due", "poison"))
            st.handle(s.RetryDue("due", "fine"))
    (finish,) = [i for i in out if isinstance(i, s.Finish) and i.task_id == "poison"]
    r = finish.result
    assert r.state == common_pb2.TASK_STATE_FAILED and r.error_kind == INFRA
    assert not r.has_reward and r.attempts == 3
    assert r.error.startswith("quarantined: its attempts ended with the loss of its worker 3 times")
    for cause in ("poison#1: agent service a:1 lost", "poison#2: ServiceUnavailableError",
                  "poison#3: env service e:1 lost"):  # fmt: skip
        assert cause in r.error
    assert st.quarantined == 1
    # "fine" lost its worker only twice: it is retried, not quarantined
    assert "fine" in st.tasks and st.tasks["fine"].state != common_pb2.TASK_STATE_FAILED


def test_ordinary_infra_failures_do_not_count_towards_quarantine() -> None:
    st = _state(quarantine_after=2, default_max_attempts=4)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    for attempt in range(1, 4):
        out = st.handle(s.AttemptFailed("f", "t0", f"t0#{attempt}", "SandboxError: x", True, INFRA))
        assert _kinds(out) == [s.ScheduleRetry]
        st.handle(s.RetryDue("due", "t0"))
    assert st.quarantined == 0


def test_recovered_tasks_keep_their_attempts_and_submission_order() -> None:
    st = _state()
    st.handle(s.ServiceJoined("a", s.KIND_AGENT, "a:1", 2, heartbeats=True))
    out = st.handle(s.TasksSubmitted("rec", "r", _tasks("t5", "t6", "t7"), 0, (2, 0, 1)))
    assert [(d.task_id, d.attempt_id) for d in out if isinstance(d, s.Dispatch)] == [
        ("t5", "t5#3"),
        ("t6", "t6#1"),
    ]


def test_terminal_tasks_leave_memory_but_stay_counted() -> None:
    st = _state()
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0", "t1")))
    ok = common_pb2.TaskResult(task_id="t0", state=common_pb2.TASK_STATE_SUCCEEDED)
    st.handle(s.AttemptCompleted("c", "t0", "t0#1", ok, common_pb2.Trajectory()))
    assert "t0" not in st.tasks
    assert st.counts() == {common_pb2.TASK_STATE_SUCCEEDED: 1, common_pb2.TASK_STATE_RUNNING: 1}


def _lose_worker_of(st: s.SchedulerState, task_id: str, seq: int | None) -> list[s.Instruction]:
    """The current attempt of `task_id` resumes from checkpoint `seq` (None: it started
    afresh), then its agent dies; the agent comes back and the retry falls due."""
    task = st.tasks[task_id]
    if seq is not None:
        st.handle(s.AttemptResumed("r", task_id, task.attempt_id, seq))
    out = st.handle(s.ServiceLost("l", "a:1", "no heartbeat for 4.0 s"))
    st.handle(s.ServiceJoined("back", s.KIND_AGENT, "a:1", 10, heartbeats=True))
    return out + st.handle(s.RetryDue("due", task_id))


def test_losses_between_which_the_task_got_further_do_not_quarantine_it() -> None:
    st = _state(quarantine_after=3, default_max_attempts=10)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("unlucky")))
    # five attempts in a row lose their agent, but each retry resumes further on
    for seq in (None, 2, 4, 7, 9):
        out = _lose_worker_of(st, "unlucky", seq)
        assert not [i for i in out if isinstance(i, s.Finish)], seq
    assert st.quarantined == 0 and st.tasks["unlucky"].attempt == 6
    assert len(st.tasks["unlucky"].losses) == 2  # the latest loss, and the one since


def test_a_task_that_crashes_its_worker_at_the_same_point_is_quarantined_all_the_same() -> None:
    st = _state(quarantine_after=3, default_max_attempts=10)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("poison")))
    # the first attempt gets to checkpoint 3 and crashes there; every retry resumes
    # there and crashes again: three losses without progress between them
    finishes = []
    for seq in (None, 3, 3):
        out = _lose_worker_of(st, "poison", seq)
        finishes += [i for i in out if isinstance(i, s.Finish)]
    (finish,) = finishes
    assert finish.result.error.startswith("quarantined")
    assert finish.result.attempts == 3
    # a resumption of a stale attempt says nothing
    assert st.handle(s.AttemptResumed("r", "poison", "poison#1", 99)) == []
