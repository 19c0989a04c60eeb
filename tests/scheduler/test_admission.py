"""Admission control, heterogeneous resources and level-1 packing in the state machine."""

from __future__ import annotations

from megaflow.scheduler import state as s
from megaflow.v1 import common_pb2, scheduler_pb2

INFRA = common_pb2.ERROR_KIND_INFRA


def _task(task_id: str, **fields: object) -> common_pb2.TaskSpec:
    return common_pb2.TaskSpec(task_id=task_id, problem_statement="p", **fields)  # type: ignore[arg-type]


def _state(policy: s.SchedulerPolicy | None = None, *, agents: int = 100) -> s.SchedulerState:
    st = s.SchedulerState(policy)
    st.handle(s.ServiceJoined("m", s.KIND_MODEL, "m:1", 100))
    st.handle(s.ServiceJoined("a", s.KIND_AGENT, "a:1", agents))
    return st


def _env(st: s.SchedulerState, address: str, capacity: int = 100, **res: object) -> None:
    st.handle(
        s.ServiceJoined(
            address,
            s.KIND_ENV,
            address,
            capacity,
            scheduler_pb2.HostResources(**res),  # type: ignore[arg-type]
        )
    )


def _dispatched(out: list[s.Instruction]) -> list[s.Dispatch]:
    return [i for i in out if isinstance(i, s.Dispatch)]


def _done(st: s.SchedulerState, d: s.Dispatch) -> list[s.Instruction]:
    result = common_pb2.TaskResult(task_id=d.task_id, state=common_pb2.TASK_STATE_SUCCEEDED)
    return st.handle(
        s.AttemptCompleted("c", d.task_id, d.attempt_id, result, common_pb2.Trajectory())
    )


def test_resources_are_held_per_host_and_never_over_committed() -> None:
    st = _state()
    _env(st, "e:1", cpu_millis=4000, memory_mib=8192)
    need = common_pb2.ResourceRequirements(cpu_millis=1500, memory_mib=1024)
    out = _dispatched(
        st.handle(
            s.TasksSubmitted("sub", "r", tuple(_task(f"t{i}", resources=need) for i in range(4)))
        )
    )
    assert [d.task_id for d in out] == ["t0", "t1"]  # 3 x 1500 > 4000
    host = st.env_hosts()[0]
    assert (host.cpu_millis_used, host.memory_mib_used) == (3000, 2048)
    nxt = _dispatched(_done(st, out[0]))
    assert [d.task_id for d in nxt] == ["t2"]
    assert host.cpu_millis_used == 3000
    # a late duplicate of the finished attempt releases nothing a second time
    _done(st, out[0])
    assert host.cpu_millis_used == 3000


def test_gpu_tasks_match_accelerator_and_labels_and_pack_tightly() -> None:
    st = _state()
    _env(st, "cpu:1", cpu_millis=64000)
    _env(st, "big:1", gpus=8, accelerator="h100", labels={"zone": "a"})
    _env(st, "small:1", gpus=2, accelerator="h100", labels={"zone": "a"})
    need = common_pb2.ResourceRequirements(gpus=1, accelerator="h100", labels={"zone": "a"})
    out = _dispatched(st.handle(s.TasksSubmitted("sub", "r", (_task("g", resources=need),))))
    assert out[0].env == "small:1"  # best fit: keep the 8-GPU host whole
    out = _dispatched(st.handle(s.TasksSubmitted("sub2", "r2", (_task("plain"),))))
    assert out[0].env in ("cpu:1", "big:1")  # no needs: the least loaded host


def test_a_task_that_can_never_fit_is_named_with_its_unmet_requirement() -> None:
    st = _state(s.SchedulerPolicy(pools={"gpu": 2}))
    assert st.rejection(_task("t", resources=common_pb2.ResourceRequirements(gpus=1))) is None
    _env(st, "e:1", cpu_millis=2000, gpus=0)
    why = st.rejection(_task("t", resources=common_pb2.ResourceRequirements(cpu_millis=4000)))
    assert why is not None and "cpu_millis=4000" in why
    why = st.rejection(_task("t", resources=common_pb2.ResourceRequirements(gpus=1)))
    assert why is not None and "gpus=1" in why
    why = st.rejection(_task("t", pool="tpu"))
    assert why is not None and "'tpu'" in why
    assert st.rejection(_task("t", pool="gpu")) is None


def test_warm_image_host_is_preferred_over_cached_over_neither() -> None:
    st = _state()
    _env(st, "cold:1")
    _env(st, "cached:1", cached_images=["py"])
    _env(st, "warm:1", warm_images={"py": 1})
    out = _dispatched(
        st.handle(s.TasksSubmitted("sub", "r", tuple(_task(f"t{i}", image="py") for i in range(3))))
    )
    # the warm pool holds one; then the image is cached on both (a warm pool's host keeps
    # the image), equally loaded: never the host without it
    envs = [d.env for d in out]
    assert envs[:2] == ["warm:1", "cached:1"] and envs[2] in ("warm:1", "cached:1")
    assert st.services[(s.KIND_ENV, "warm:1")].warm_placements == 1
    # once the warm attempt ends its pool refills and it is preferred again
    _done(st, out[0])
    out = _dispatched(st.handle(s.TasksSubmitted("sub2", "r2", (_task("u", image="py"),))))
    assert out[0].env == "warm:1"


def test_agent_loop_is_placed_beside_its_environment_host() -> None:
    st = s.SchedulerState()
    st.handle(s.ServiceJoined("m", s.KIND_MODEL, "m:1", 100))
    st.handle(s.ServiceJoined("a1", s.KIND_AGENT, "node1:7000", 100))
    st.handle(s.ServiceJoined("a2", s.KIND_AGENT, "node2:7000", 100))
    st.handle(
        s.ServiceJoined(
            "a3",
            s.KIND_AGENT,
            "10.0.0.9:7000",
            100,
            scheduler_pb2.HostResources(labels={"node": "node3"}),
        )
    )
    _env(st, "node2:7001", warm_images={"a": 5})
    _env(st, "node3:7001", warm_images={"b": 5})
    tasks = (_task("x", image="a"), _task("y", image="b"), _task("z", image="a"))
    out = _dispatched(st.handle(s.TasksSubmitted("sub", "r", tasks)))
    assert [(d.env, d.agent) for d in out] == [
        ("node2:7001", "node2:7000"),
        ("node3:7001", "10.0.0.9:7000"),  # by its node label
        ("node2:7001", "node2:7000"),
    ]


def test_a_user_at_its_quota_does_not_block_other_users() -> None:
    st = _state(s.SchedulerPolicy(user_max_in_flight={"alice": 1}))
    _env(st, "e:1")
    tasks = (*(_task(f"a{i}", user="alice") for i in range(1000)), _task("b0", user="bob"))
    out = _dispatched(st.handle(s.TasksSubmitted("sub", "r", tasks)))
    assert [d.task_id for d in out] == ["a0", "b0"]
    assert st.queue.blocked_classes(("user", "alice")) == 1
    out = _dispatched(st.handle(s.TasksSubmitted("sub2", "r2", (_task("b1", user="bob"),))))
    assert [d.task_id for d in out] == ["b1"]
    out = _dispatched(_done(st, s.Dispatch("r", "a0", 1, "a0#1", "", "", "")))
    assert [d.task_id for d in out] == ["a1"]


def test_higher_priority_first_then_earliest_deadline_then_submission_order() -> None:
    st = _state(agents=1)
    _env(st, "e:1")
    st.handle(s.TasksSubmitted("sub0", "r0", (_task("running"),)), now=0.0)
    tasks = (
        _task("late", deadline_s=100),
        _task("none"),
        _task("soon", deadline_s=5),
        _task("urgent", priority=5),
        _task("soon2", deadline_s=5),
    )
    st.handle(s.TasksSubmitted("sub", "r", tasks), now=1.0)
    order = []
    current = s.Dispatch("r0", "running", 1, "running#1", "", "", "")
    for _ in range(len(tasks)):
        (current,) = _dispatched(_done(st, current))
        order.append(current.task_id)
    assert order == ["urgent", "soon", "soon2", "late", "none"]


def test_resource_pool_is_a_semaphore() -> None:
    st = _state(s.SchedulerPolicy(pools={"gpu": 2}))
    _env(st, "e:1")
    tasks = (*(_task(f"g{i}", pool="gpu") for i in range(4)), _task("cpu"))
    out = _dispatched(st.handle(s.TasksSubmitted("sub", "r", tasks)))
    assert [d.task_id for d in out] == ["g0", "g1", "cpu"]
    assert st.snapshot().pools["pool:gpu"] == (2, 2)
    assert [d.task_id for d in _dispatched(_done(st, out[0]))] == ["g2"]


def test_model_in_flight_limit_and_dispatch_rate() -> None:
    policy = s.SchedulerPolicy(model_max_in_flight={"big": 1}, model_dispatch_rate={"fast": 2.0})
    st = _state(policy)
    _env(st, "e:1")
    tasks = tuple(_task(f"b{i}", model="big") for i in range(2)) + tuple(
        _task(f"f{i}", model="fast") for i in range(5)
    )
    out = st.handle(s.TasksSubmitted("sub", "r", tasks), now=10.0)
    assert [d.task_id for d in _dispatched(out)] == ["b0", "f0", "f1"]  # burst of 2 tokens
    (wake,) = [i for i in out if isinstance(i, s.WakeAt)]
    assert wake.delay_s == 0.5  # the next token
    assert _dispatched(st.handle(s.Wake("w"), now=10.2)) == []
    out = st.handle(s.Wake("w"), now=10.5)
    assert [d.task_id for d in _dispatched(out)] == ["f2"]
    assert [i.delay_s for i in out if isinstance(i, s.WakeAt)] == [0.5]


def test_dispatched_attempt_counts_against_caps_until_its_outcome() -> None:
    # A dispatched attempt whose sandbox is still starting holds its slot: nothing more
    # is dispatched until the outcome of that attempt is handled.
    st = _state(s.SchedulerPolicy(default_user_max_in_flight=2))
    _env(st, "e:1", capacity=2)
    out = _dispatched(
        st.handle(s.TasksSubmitted("sub", "r", tuple(_task(f"t{i}") for i in range(5))))
    )
    assert len(out) == 2
    assert st.handle(s.ServiceJoined("again", s.KIND_AGENT, "a:1", 100)) == []
    failed = st.handle(s.AttemptFailed("f", "t0", "t0#1", "setup failed", True, INFRA))
    assert [type(i) for i in failed] == [s.ScheduleRetry, s.Dispatch]


def test_snapshot_reports_queue_depth_and_waits() -> None:
    st = _state(s.SchedulerPolicy(user_max_in_flight={"u": 1}))
    _env(st, "e:1")
    tasks = tuple(_task(f"t{i}", user="u") for i in range(3))
    (first,) = _dispatched(st.handle(s.TasksSubmitted("sub", "r", tasks), now=0.0))
    _done_out = st.handle(
        s.AttemptCompleted(
            "c", first.task_id, first.attempt_id, common_pb2.TaskResult(), common_pb2.Trajectory()
        ),
        now=4.0,
    )
    snap = st.snapshot()
    assert snap.queued == 1 and snap.runs["r"] == (1, 1) and snap.users["u"] == (1, 1)
    assert snap.oldest_wait_s == 4.0
    assert sorted(snap.waits) == [0.0, 4.0]
    assert len(_dispatched(_done_out)) == 1
