"""Hypothesis properties of admission control and resource placement.

Random interleavings of submissions (tasks with resource needs, users, pools, models,
priorities and deadlines), host losses and re-joins, completions, failures, stale
results and retries. After every event, checked against the test's own accounting of
what runs where (not the scheduler's counters):

- resources are never over-committed on any host (CPU, memory, GPUs, capacity) and a
  task only runs on a host with its accelerator and labels;
- user quotas, pool semaphores, model limits and run caps are never exceeded;
- a higher-priority queued task is never passed over for a lower-priority one that
  took resources the higher one could have used;
- at the end every task is terminal exactly once and no capacity is leaked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from megaflow.scheduler import state as s
from megaflow.scheduler.resources import Need, Offer
from megaflow.v1 import common_pb2, scheduler_pb2

INFRA = common_pb2.ERROR_KIND_INFRA
R = common_pb2.ResourceRequirements
HOSTS = {
    "e:1": (
        3,
        scheduler_pb2.HostResources(cpu_millis=4000, memory_mib=4096, gpus=2, accelerator="h100"),
    ),
    "e:2": (3, scheduler_pb2.HostResources(cpu_millis=2000, memory_mib=8192, labels={"zone": "b"})),
}
AGENTS = {"a:1": 4, "a:2": 2}
SHAPES = [
    R(),
    R(cpu_millis=1000),
    R(cpu_millis=2000, memory_mib=2048),
    R(gpus=1, accelerator="h100"),
    R(cpu_millis=500, labels={"zone": "b"}),
]
POLICY = s.SchedulerPolicy(
    default_max_attempts=3,
    pools={"p": 2},
    user_max_in_flight={"u1": 2},
    default_user_max_in_flight=3,
    model_max_in_flight={"m1": 2},
)


@dataclass
class Running:
    attempt_id: str
    spec: common_pb2.TaskSpec
    run_id: str
    env: tuple[str, int]  # (address, incarnation)
    agent: tuple[str, int]


class Model:
    def __init__(self) -> None:
        self.state = s.SchedulerState(POLICY)
        self.now = 0.0  # the clock passed with every event (a fallen host is out until later)
        self.specs: dict[str, tuple[common_pb2.TaskSpec, str]] = {}  # task -> (spec, run)
        self.caps: dict[str, int] = {}
        self.running: dict[str, Running] = {}
        self.finished: dict[str, int] = {}
        self.retries: set[str] = set()
        self.stale: list[tuple[str, str]] = []
        self.incarnation: dict[str, int] = {}
        self.present: set[str] = set()

    def join(self, address: str) -> None:
        if address not in self.present:
            self.present.add(address)
            self.incarnation[address] = self.incarnation.get(address, 0) + 1
        if address in HOSTS:
            cap, res = HOSTS[address]
            self.apply(s.ServiceJoined("j", s.KIND_ENV, address, cap, res))
        elif address in AGENTS:
            self.apply(s.ServiceJoined("j", s.KIND_AGENT, address, AGENTS[address]))
        else:
            self.apply(s.ServiceJoined("j", s.KIND_MODEL, address, 100))

    def lose(self, address: str) -> None:
        self.present.discard(address)
        self.apply(s.ServiceLost("l", address))

    def apply(self, event: s.Event) -> None:
        dispatched: list[Running] = []
        for instruction in self.state.handle(event, self.now):
            match instruction:
                case s.Dispatch():
                    assert instruction.task_id not in self.running, "assigned twice"
                    spec, run_id = self.specs[instruction.task_id]
                    r = Running(
                        instruction.attempt_id,
                        spec,
                        run_id,
                        (instruction.env, self.incarnation[instruction.env]),
                        (instruction.agent, self.incarnation[instruction.agent]),
                    )
                    self.running[instruction.task_id] = r
                    dispatched.append(r)
                case s.Finish():
                    tid = instruction.task_id
                    self.finished[tid] = self.finished.get(tid, 0) + 1
                    if instruction.result.error_kind == INFRA:
                        assert not instruction.result.has_reward
                case s.ScheduleRetry():
                    self.retries.add(instruction.task_id)
                case s.CancelAttempt():  # its host was lost: the attempt failed already
                    r = self.running.pop(instruction.task_id)
                    self.stale.append((instruction.task_id, r.attempt_id))
        self.check(dispatched)

    # -- the test's own accounting ------------------------------------------------------
    def on_host(self, address: str) -> list[Running]:
        here = (address, self.incarnation.get(address, 0))
        return [r for r in self.running.values() if r.env == here]

    def used(self, address: str, minus: Running | None = None) -> tuple[int, int, int, int]:
        rs = [r for r in self.on_host(address) if r is not minus]
        needs = [r.spec.resources for r in rs]
        return (
            len(rs),
            sum(n.cpu_millis for n in needs),
            sum(n.memory_mib for n in needs),
            sum(n.gpus for n in needs),
        )

    def count(self, pred: object, minus: Running | None = None) -> int:
        return sum(1 for r in self.running.values() if r is not minus and pred(r))  # type: ignore[operator]

    def fits(self, address: str, spec: common_pb2.TaskSpec, minus: Running | None = None) -> bool:
        cap, res = HOSTS[address]
        n, cpu, mem, gpus = self.used(address, minus)
        need, offer = spec.resources, Offer.of(res)
        return (
            n + 1 <= cap
            and cpu + need.cpu_millis <= offer.cpu_millis
            and mem + need.memory_mib <= offer.memory_mib
            and gpus + need.gpus <= offer.gpus
            and (not need.accelerator or need.accelerator == offer.accelerator)
            and all(offer.labels.get(k) == v for k, v in Need.of(spec).labels)
        )

    def admissible(self, spec: common_pb2.TaskSpec, run_id: str, minus: Running | None) -> bool:
        cap = self.caps[run_id]
        quota = POLICY.user_max_in_flight.get(spec.user, POLICY.default_user_max_in_flight)
        model_limit = POLICY.model_max_in_flight.get(spec.model, 0)
        return (
            (not cap or self.count(lambda r: r.run_id == run_id, minus) < cap)
            and self.count(lambda r: r.spec.user == spec.user, minus) < quota
            and (not spec.pool or self.count(lambda r: r.spec.pool == spec.pool, minus) < 2)
            and (
                not model_limit
                or self.count(lambda r: r.spec.model == spec.model, minus) < model_limit
            )
        )

    def check(self, dispatched: list[Running]) -> None:
        for address in self.present & set(HOSTS):
            for r in self.on_host(address):
                assert self.fits(address, r.spec, minus=r), f"{address} over-committed"
        for address in self.present & set(AGENTS):
            here = (address, self.incarnation[address])
            n = sum(1 for r in self.running.values() if r.agent == here)
            assert n <= AGENTS[address], "agent over cap"
        for r in self.running.values():
            assert self.admissible(r.spec, r.run_id, minus=r), "quota, pool or cap exceeded"
        queued = [
            t
            for t in self.specs
            if t not in self.running and t not in self.finished and t not in self.retries
        ]
        for low in dispatched:
            for tid in queued:
                spec, run_id = self.specs[tid]
                if spec.priority <= low.spec.priority or low.env[0] not in self.present:
                    continue
                could = self.admissible(spec, run_id, low) and self.fits(low.env[0], spec, low)
                assert not could, (
                    f"{tid} (priority {spec.priority}) passed over for {low.spec.task_id}"
                )


task_st = st.tuples(
    st.integers(0, len(SHAPES) - 1),
    st.sampled_from(["", "u1", "u2"]),
    st.sampled_from(["", "p"]),
    st.sampled_from(["", "m1"]),
    st.integers(0, 2),
    st.sampled_from([0.0, 1.0, 5.0]),
    st.sampled_from(["i0", "i1"]),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.lists(task_st, min_size=1, max_size=6), st.integers(0, 3)),
        st.tuples(st.just("lose"), st.sampled_from(["a:2", "e:2"]), st.just(0)),
        st.tuples(st.just("join"), st.sampled_from(["a:2", "e:2"]), st.just(0)),
        st.tuples(st.just("complete"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("fail"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("retry_due"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("stale"), st.integers(0, 50), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_admission_invariants_hold_under_any_interleaving(script: list[tuple]) -> None:  # type: ignore[type-arg]
    m = Model()
    for address in ("m:1", "a:1", "a:2", "e:1", "e:2"):
        m.join(address)
    n = 0
    for i, (op, x, y) in enumerate(script):
        if op == "submit":
            specs = []
            for shape, user, pool, model, prio, deadline, image in x:
                spec = common_pb2.TaskSpec(
                    task_id=f"t{n}",
                    problem_statement="p",
                    resources=SHAPES[shape],
                    user=user,
                    pool=pool,
                    model=model,
                    priority=prio,
                    deadline_s=deadline,
                    image=image,
                )
                m.specs[spec.task_id] = (spec, f"r{i}")
                specs.append(spec)
                n += 1
            m.caps[f"r{i}"] = y
            m.apply(s.TasksSubmitted(f"op{i}", f"r{i}", tuple(specs), max_concurrency=y))
        elif op == "lose":
            m.lose(x)
        elif op == "join":
            m.join(x)
        elif op == "stale":
            for old_task, old_attempt in m.stale:
                traj = common_pb2.Trajectory()
                m.apply(
                    s.AttemptCompleted("st", old_task, old_attempt, common_pb2.TaskResult(), traj)
                )
        elif op in ("complete", "fail") and m.running:
            tid = sorted(m.running)[x % len(m.running)]
            r = m.running.pop(tid)
            m.stale.append((tid, r.attempt_id))
            if op == "complete":
                result = common_pb2.TaskResult(task_id=tid, state=common_pb2.TASK_STATE_SUCCEEDED)
                m.apply(s.AttemptCompleted("c", tid, r.attempt_id, result, common_pb2.Trajectory()))
            else:
                m.apply(s.AttemptFailed("f", tid, r.attempt_id, "boom", bool(y), INFRA))
        elif op == "retry_due" and m.retries:
            tid = sorted(m.retries)[x % len(m.retries)]
            m.retries.discard(tid)
            m.apply(s.RetryDue("due", tid))
    # every host back, and past its time out of placement, so that every task can finish
    m.now += 3600.0
    for address in ("a:2", "e:2"):
        m.join(address)
    m.now += 3600.0  # ...and past the time a host that came back waits before it is used
    m.apply(s.Wake("later"))
    for _ in range(2000):
        if m.running:
            tid, r = next(iter(m.running.items()))
            del m.running[tid]
            result = common_pb2.TaskResult(task_id=tid, state=common_pb2.TASK_STATE_SUCCEEDED)
            m.apply(s.AttemptCompleted("d", tid, r.attempt_id, result, common_pb2.Trajectory()))
        elif m.retries:
            m.apply(s.RetryDue("d", m.retries.pop()))
        else:
            break
    assert set(m.finished) == set(m.specs), "a task never finished"
    assert all(c == 1 for c in m.finished.values()), "a task finished twice"
    st_ = m.state
    for svc in st_.services.values():
        assert (svc.in_flight, svc.cpu_millis_used, svc.memory_mib_used, svc.gpus_used) == (
            0,
            0,
            0,
            0,
        ), f"capacity leaked on {svc.address}"
    assert not st_.user_in_flight and len(st_.queue) == 0
    assert not any(st_.pool_in_flight.values()) and not any(st_.model_in_flight.values())
    assert all(run.in_flight == 0 and run.queued == 0 for run in st_.runs.values())
