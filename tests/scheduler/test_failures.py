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
    # ...until its agent heartbeats (alive after all, with its accounting intact) and its
    # clients had the time to reconnect (host_rejoin_s after it came back)
    out = st.handle(s.ServiceJoined("hb", s.KIND_AGENT, "a:1", 10, heartbeats=True), 10.0)
    assert not [i for i in out if isinstance(i, s.Dispatch)]
    (wake,) = [i for i in out if isinstance(i, s.WakeAt)]
    assert wake.delay_s == st.policy.host_rejoin_s
    out = st.handle(s.Wake("w"), 10.0 + wake.delay_s)
    assert [i.attempt_id for i in out if isinstance(i, s.Dispatch)] == ["t0#2"]
    assert not st.suspect
    # a silent one is dropped by the watchdog from the suspects too
    st.handle(s.AttemptFailed("f", "t0", "t0#2", AGENT_GONE, True, INFRA, unreachable=("a:1",)))
    st.handle(s.ServiceLost("l", "a:1"))
    assert (s.KIND_AGENT, "a:1") not in st.services and (s.KIND_AGENT, "a:1") not in st.suspect


def test_a_host_that_keeps_falling_stays_out_longer_each_time_until_it_serves() -> None:
    st = _state(host_backoff_base_s=1.0, host_backoff_max_s=8.0, host_rejoin_s=0.0)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    now, outs = 0.0, []
    for n in range(1, 6):  # the env host falls each time it is used
        task = st.tasks["t0"]
        gone = f"ServiceUnavailableError: e:1 unreachable ({n})"
        st.handle(s.AttemptFailed("f", "t0", task.attempt_id, gone, True, INFRA,
                                  unreachable=("e:1",)), now)  # fmt: skip
        st.handle(s.RetryDue("due", "t0"), now)
        out = st.handle(s.ServiceJoined("hb", s.KIND_ENV, "e:1", 10, heartbeats=True), now)
        (wake,) = [i for i in out if isinstance(i, s.WakeAt)]
        outs.append(wake.delay_s)
        now += wake.delay_s
        assert [i for i in st.handle(s.Wake("w"), now) if isinstance(i, s.Dispatch)]
    # full jitter over the upper half of a doubling backoff, capped
    for n, delay in enumerate(outs):
        assert min(2**n, 8) / 2 <= delay <= min(2**n, 8), outs
    # an attempt completed on it: it is well again, its next fall starts over
    ok = common_pb2.TaskResult(task_id="t0", state=common_pb2.TASK_STATE_SUCCEEDED)
    st.handle(s.AttemptCompleted("c", "t0", st.tasks["t0"].attempt_id, ok, common_pb2.Trajectory()))
    assert not st.down


def test_a_lone_host_that_dies_twice_neither_quarantines_nor_exhausts_its_tasks() -> None:
    # the shape of a small team: one env host and one agent; the env host is killed
    # (its attempts fail unreachable, then the watchdog drops it) and comes back, twice
    st = _state(quarantine_after=2, default_max_attempts=2)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0", "t1", "t2")))
    now = 0.0
    for death in range(3):
        for task_id in ("t0", "t1"):
            task = st.tasks[task_id]
            st.handle(s.AttemptFailed("f", task_id, task.attempt_id, ENV_GONE, True, INFRA,
                                      unreachable=("e:1",)), now)  # fmt: skip
        out = st.handle(s.ServiceLost("l", "e:1", "no heartbeat for 4.1 s"), now + 4)
        assert _kinds(out).count(s.ScheduleRetry) == 1  # t2 was still running there
        for task_id in ("t0", "t1", "t2"):  # no host: the retries wait, placed nowhere
            assert not [i for i in st.handle(s.RetryDue("d", task_id), now + 5)
                        if isinstance(i, s.Dispatch)]  # fmt: skip
        st.handle(s.ServiceJoined("back", s.KIND_ENV, "e:1", 10, heartbeats=True), now + 8)
        out = st.handle(s.Wake("w"), now + 8 + st.policy.host_rejoin_s)
        assert len([i for i in out if isinstance(i, s.Dispatch)]) == 3, death
        now += 20
    assert st.quarantined == 0
    assert all(t.state == common_pb2.TASK_STATE_RUNNING for t in st.tasks.values())
    assert {t.attempt for t in st.tasks.values()} == {4}  # 3 lost to outages, not counted
    for task_id in ("t0", "t1", "t2"):
        ok = common_pb2.TaskResult(task_id=task_id, state=common_pb2.TASK_STATE_SUCCEEDED)
        out = st.handle(s.AttemptCompleted("c", task_id, f"{task_id}#4", ok,
                                           common_pb2.Trajectory()), now)  # fmt: skip
        (finish,) = [i for i in out if isinstance(i, s.Finish)]
        assert finish.result.state == common_pb2.TASK_STATE_SUCCEEDED


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
    now = 0.0
    for n, event in enumerate(causes, start=1):
        out = st.handle(event, now)
        if n < 3:
            assert any(isinstance(i, s.ScheduleRetry) and i.task_id == "poison" for i in out)
            # the worker comes back (a supervisor restarted it), the task goes again
            st.handle(s.ServiceJoined("back", s.KIND_AGENT, "a:1", 10, heartbeats=True), now + 1)
            st.handle(s.ServiceJoined("back", s.KIND_ENV, "e:1", 10, heartbeats=True), now + 1)
            now += 60
            st.handle(s.RetryDue("due", "poison"), now)
            st.handle(s.RetryDue("due", "fine"), now)
    (finish,) = [i for i in out if isinstance(i, s.Finish) and i.task_id == "poison"]
    r = finish.result
    assert r.state == common_pb2.TASK_STATE_FAILED and r.error_kind == INFRA
    assert not r.has_reward and r.attempts == 3
    assert r.error.startswith(
        "quarantined: its attempts ended with the loss of its worker 3 times on 2 hosts"
    )
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


def _lose_worker_of(
    st: s.SchedulerState, task_id: str, seq: int | None, now: float
) -> list[s.Instruction]:
    """The current attempt of `task_id` resumes from checkpoint `seq` (None: it started
    afresh), then its agent (wherever it runs) dies; the agent comes back and the retry
    falls due a minute later."""
    task = st.tasks[task_id]
    if seq is not None:
        st.handle(s.AttemptResumed("r", task_id, task.attempt_id, seq), now)
    agent = task.placement[0].address
    out = st.handle(s.ServiceLost("l", agent, "no heartbeat for 4.0 s"), now)
    st.handle(s.ServiceJoined("back", s.KIND_AGENT, agent, 10, heartbeats=True), now + 1)
    return out + st.handle(s.RetryDue("due", task_id), now + 60)


def test_losses_between_which_the_task_got_further_do_not_quarantine_it() -> None:
    st = _state(quarantine_after=3, default_max_attempts=10)
    st.handle(s.ServiceJoined("a", s.KIND_AGENT, "a:2", 10, heartbeats=True))
    st.handle(s.TasksSubmitted("sub", "r", _tasks("unlucky")))
    # five attempts in a row lose their agent, but each retry resumes further on
    for n, seq in enumerate((None, 2, 4, 7, 9)):
        out = _lose_worker_of(st, "unlucky", seq, 100.0 * n)
        assert not [i for i in out if isinstance(i, s.Finish)], seq
    assert st.quarantined == 0 and st.tasks["unlucky"].attempt == 6
    assert len(st.tasks["unlucky"].losses) == 2  # the latest loss, and the one since


def test_a_task_that_crashes_its_worker_at_the_same_point_is_quarantined_all_the_same() -> None:
    st = _state(quarantine_after=3, default_max_attempts=10)
    st.handle(s.ServiceJoined("a", s.KIND_AGENT, "a:2", 10, heartbeats=True))
    st.handle(s.TasksSubmitted("sub", "r", _tasks("poison")))
    # the first attempt gets to checkpoint 3 and crashes there; every retry resumes
    # there and crashes again, on whichever agent it runs: three losses without
    # progress between them, on two hosts
    finishes, agents = [], set()
    for n, seq in enumerate((None, 3, 3)):
        agents.add(st.tasks["poison"].placement[0].address)
        out = _lose_worker_of(st, "poison", seq, 100.0 * n)
        finishes += [i for i in out if isinstance(i, s.Finish)]
    assert agents == {"a:1", "a:2"}
    (finish,) = finishes
    assert finish.result.error.startswith("quarantined")
    assert finish.result.attempts == 3
    # a resumption of a stale attempt says nothing
    assert st.handle(s.AttemptResumed("r", "poison", "poison#1", 99)) == []


def test_losses_all_on_one_host_are_the_hosts_deaths_not_the_tasks() -> None:
    st = _state(quarantine_after=3, default_max_attempts=2, max_outage_retries=4)
    st.handle(s.TasksSubmitted("sub", "r", _tasks("t0")))
    finishes = []
    for n in range(6):
        finishes += [
            i for i in _lose_worker_of(st, "t0", None, 100.0 * n) if isinstance(i, s.Finish)
        ]
    # never quarantined; bounded all the same: 4 outages free, then its 2 attempts
    (finish,) = finishes
    assert st.quarantined == 0
    assert finish.result.error.startswith("gave up after 6 attempts")
