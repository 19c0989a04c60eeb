"""The scheduler's pure state machine, without any I/O."""

from __future__ import annotations

from megaflow.scheduler import state as s
from megaflow.v1 import common_pb2


def _tasks(n: int, max_attempts: int = 0) -> tuple[common_pb2.TaskSpec, ...]:
    return tuple(
        common_pb2.TaskSpec(task_id=f"t{i}", problem_statement="p", max_attempts=max_attempts)
        for i in range(n)
    )


def _state(agents: int = 100, envs: int = 100) -> s.SchedulerState:
    st = s.SchedulerState(s.SchedulerPolicy(retry_base_s=1.0))
    st.handle(s.ServiceJoined("j1", s.KIND_MODEL, "m:1", 10))
    st.handle(s.ServiceJoined("j2", s.KIND_ENV, "e:1", envs))
    st.handle(s.ServiceJoined("j3", s.KIND_AGENT, "a:1", agents))
    return st


def _result(task_id: str, attempt_id: str, reward: float = 1.0) -> common_pb2.TaskResult:
    return common_pb2.TaskResult(
        task_id=task_id,
        attempt_id=attempt_id,
        state=common_pb2.TASK_STATE_SUCCEEDED,
        has_reward=True,
        reward=reward,
    )


def test_dispatch_is_fifo_and_capped_per_run() -> None:
    st = _state()
    out = st.handle(s.TasksSubmitted("sub", "r", _tasks(5), max_concurrency=2))
    assert out == [
        s.Dispatch("r", "t0", 1, "t0#1", "a:1", "e:1", "m:1"),
        s.Dispatch("r", "t1", 1, "t1#1", "a:1", "e:1", "m:1"),
    ]
    traj = common_pb2.Trajectory()
    out = st.handle(s.AttemptCompleted("c", "t0", "t0#1", _result("t0", "t0#1"), traj))
    assert isinstance(out[0], s.Finish) and out[0].task_id == "t0"
    assert out[1] == s.Dispatch("r", "t2", 1, "t2#1", "a:1", "e:1", "m:1")


def test_service_capacity_is_a_hard_cap() -> None:
    st = _state(agents=1)
    out = st.handle(s.TasksSubmitted("sub", "r", _tasks(3)))
    assert [type(i) for i in out] == [s.Dispatch]


def test_nothing_dispatched_until_every_kind_of_service_exists() -> None:
    st = s.SchedulerState()
    assert st.handle(s.TasksSubmitted("sub", "r", _tasks(2))) == []
    st.handle(s.ServiceJoined("j1", s.KIND_MODEL, "m:1", 10))
    assert st.handle(s.ServiceJoined("j2", s.KIND_ENV, "e:1", 10)) == []
    out = st.handle(s.ServiceJoined("j3", s.KIND_AGENT, "a:1", 10))
    assert [i.task_id for i in out if isinstance(i, s.Dispatch)] == ["t0", "t1"]


def test_infra_failure_is_retried_with_backoff_then_gives_up_without_reward() -> None:
    st = _state()
    st.handle(s.TasksSubmitted("sub", "r", _tasks(1, max_attempts=2)))
    infra = common_pb2.ERROR_KIND_INFRA
    out = st.handle(s.AttemptFailed("f1", "t0", "t0#1", "sandbox died", True, infra))
    assert out == [s.ScheduleRetry("r", "t0", 1, 1.0, "sandbox died")]
    out = st.handle(s.RetryDue("due", "t0"))
    assert out == [s.Dispatch("r", "t0", 2, "t0#2", "a:1", "e:1", "m:1")]
    out = st.handle(s.AttemptFailed("f2", "t0", "t0#2", "sandbox died", True, infra))
    finish, run_finished = out
    assert isinstance(finish, s.Finish)
    assert finish.result.state == common_pb2.TASK_STATE_FAILED
    assert finish.result.error_kind == common_pb2.ERROR_KIND_INFRA
    assert not finish.result.has_reward  # never scored as reward 0
    assert finish.result.attempts == 2
    assert run_finished == s.RunFinished("r")


def test_non_retryable_failure_is_final() -> None:
    st = _state()
    st.handle(s.TasksSubmitted("sub", "r", _tasks(1)))
    out = st.handle(s.AttemptFailed("f", "t0", "t0#1", "bad", False, common_pb2.ERROR_KIND_INVALID))
    assert isinstance(out[0], s.Finish)
    assert out[0].result.error_kind == common_pb2.ERROR_KIND_INVALID


def test_late_result_of_a_superseded_attempt_is_discarded_and_reported() -> None:
    st = _state()
    st.handle(s.TasksSubmitted("sub", "r", _tasks(1)))
    st.handle(s.AttemptFailed("f", "t0", "t0#1", "x", True, common_pb2.ERROR_KIND_INFRA))
    st.handle(s.RetryDue("due", "t0"))
    traj = common_pb2.Trajectory()
    late = st.handle(s.AttemptCompleted("late", "t0", "t0#1", _result("t0", "t0#1"), traj))
    assert late == [s.LateResult("t0", "t0#1", "t0#2", "result")]
    assert st.late_results == 1
    out = st.handle(s.AttemptCompleted("ok", "t0", "t0#2", _result("t0", "t0#2"), traj))
    assert isinstance(out[0], s.Finish) and out[0].result.attempts == 2
    # and a duplicate of the current one is discarded too: exactly one terminal state
    dup = st.handle(s.AttemptCompleted("dup", "t0", "t0#2", _result("t0", "t0#2"), traj))
    assert dup == [s.LateResult("t0", "t0#2", "", "result")]
    failed = st.handle(s.AttemptFailed("f2", "t0", "t0#1", "x", True, common_pb2.ERROR_KIND_INFRA))
    assert failed == [s.LateResult("t0", "t0#1", "", "failure")]
    assert st.late_results == 3
    assert st.counts() == {common_pb2.TASK_STATE_SUCCEEDED: 1}


def test_capacity_is_returned_after_each_attempt() -> None:
    st = _state(agents=2, envs=2)
    st.handle(s.TasksSubmitted("sub", "r", _tasks(6)))
    traj = common_pb2.Trajectory()
    finished = 0
    pending = [f"t{i}" for i in range(2)]
    while pending:
        tid = pending.pop(0)
        out = st.handle(
            s.AttemptCompleted(f"c{tid}", tid, f"{tid}#1", _result(tid, f"{tid}#1"), traj)
        )
        finished += sum(isinstance(i, s.Finish) for i in out)
        pending += [i.task_id for i in out if isinstance(i, s.Dispatch)]
    assert finished == 6
    assert all(svc.in_flight == 0 for svc in st.services.values())


def test_least_loaded_agent_is_chosen() -> None:
    st = _state()
    st.handle(s.ServiceJoined("j", s.KIND_AGENT, "a:2", 100))
    out = st.handle(s.TasksSubmitted("sub", "r", _tasks(4)))
    agents = [i.agent for i in out if isinstance(i, s.Dispatch)]
    assert sorted(agents) == ["a:1", "a:1", "a:2", "a:2"]
