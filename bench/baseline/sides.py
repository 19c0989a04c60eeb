"""One concurrency level of each system, measured the same way.

MegaFlow: the real embedded system (scheduler, Model Service with its sticky
least-loaded router over one replica per simulated GPU, Agent Service, and the
simulated Environment Service with faults), `waves x N` tasks submitted with
`max_concurrency=N`; the scheduler retries infrastructure failures (its default policy).

Monolith: one process, `W` workers; each takes the next task and runs it end to end
(create sandbox, then model call, tool call, model call, ... submit) with the same agent
logic (`TaskSession` with the built-in tool agent), calling the inference replicas
directly, round-robin per request (a plain OpenAI-compatible endpoint behind a load
balancer: no task affinity), its sandboxes co-hosted on the GPU node (environment
operations hold a core for their CPU part), and no retries: a task that meets an
infrastructure fault is failed. It reaches its sandboxes through a measured path
(`Scenario.monolith_path`: `docker run` per task, then `docker exec`, SWE-ReX or nothing
per operation); MegaFlow through its own measured path (`Scenario.megaflow_path`).

Both: the same `MeteredGpu` replicas and `FaultyEnv` draws, the same task ids. The
measurement window is [the N/2-th finish, the ((waves-1) x N)-th finish], when every
worker/slot is busy: throughput (model calls completed per second), GPU utilisation
(busy slot-time / slot-time) and the steps (turns) that started inside it.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import psutil

from bench.baseline.scenario import FaultyEnv, Mechanism, MeteredGpu, Scenario
from bench.stats import pct
from megaflow.agent.session import AgentLimits, TaskSession
from megaflow.contract import ModelService
from megaflow.core.errors import InfrastructureError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.model.service import ModelServiceConfig
from megaflow.tasks.swe_synth import generate_task
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2, scheduler_pb2

MODEL = "sim"


@dataclass
class TaskRecord:
    finished: float  # monotonic wall clock
    started: float
    setup_s: float
    infra_failed: bool
    reward: float | None = None
    turns: list[tuple[float, float]] = field(default_factory=list)  # (model_s, env_s), wall
    overhead_s: float = 0.0  # wall s of the attempt outside setup, teardown and turns


def _overhead(result: common_pb2.TaskResult, turns: list[tuple[float, float]]) -> float:
    """The part of an attempt that is neither setup, teardown, a model call nor a tool
    call (the agent loop's own work: bench/e2e_bench.py's "overhead per step")."""
    inside = result.setup_s + result.teardown_s + sum(m + e for m, e in turns)
    return max(result.duration_s - inside, 0.0)


@dataclass
class Level:
    """The figures of one system at one offered concurrency (times in modelled s)."""

    system: str
    concurrency: int
    tasks: int
    wall_s: float
    window_s: float
    steps_per_s: float
    utilisation: float
    mean_step_s: float
    p99_step_s: float
    mean_model_s: float
    mean_env_s: float
    steps_measured: int
    failed: int
    failure_rate: float
    retries: int
    faults: int
    prefix_hit_rate: float
    env_busy: float  # mean cores held by environment operations (their CPU part)
    core_wait_s: float  # mean wait for a core per environment op (monolith)
    cpu_share: float  # this process's CPU time / wall time
    rss_per_task_kib: float
    mean_reward: float
    sustainable: bool = False
    why_not: str = ""
    path: str = ""  # how this system reached its sandboxes (`EnvPath.name`)
    path_s_per_op: float = 0.0  # of which per environment operation (modelled s)
    overhead_per_step_s: float = float("nan")  # agent loop's own wall s per step, unscaled
    mean_prompt_tokens: float = float("nan")  # per model call, as the GPU saw it
    # steady window: mean cores held by environment work, and per model call (= step)
    # GPU slot-seconds and environment core-seconds (modelled s)
    cores_busy: float = float("nan")
    slot_s_per_call: float = float("nan")
    core_s_per_call: float = float("nan")


def _rss_kib() -> int:
    return int(psutil.Process().memory_info().rss) // 1024


def _backends(sc: Scenario) -> tuple[list[MeteredGpu], list[SimulatedBackend]]:
    gpus = [MeteredGpu(sc.latency_config(i), sc.context_scale) for i in range(sc.replicas)]
    backends = [
        SimulatedBackend(MODEL, success_rate=sc.success_rate, seed=sc.seed, latency=gpu)
        for gpu in gpus
    ]
    return gpus, backends


class _Meter:
    """Samples peak RSS while a level runs."""

    def __init__(self) -> None:
        self.rss0 = _rss_kib()
        self.peak = self.rss0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, _rss_kib())
            await asyncio.sleep(0.5)

    def __enter__(self) -> _Meter:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def _turns_between(
    records: list[TaskRecord], w0: float, w1: float, k: float
) -> tuple[list[float], list[float], list[float]]:
    """(step, model, env) modelled seconds of the turns that started in [w0, w1)."""
    steps: list[float] = []
    model_s: list[float] = []
    env_s: list[float] = []
    for r in records:
        t = r.started + r.setup_s
        for m, e in r.turns:
            if w0 <= t < w1:
                steps.append((m + e) / k)
                model_s.append(m / k)
                env_s.append(e / k)
            t += m + e
    return steps, model_s, env_s


def summarise(
    system: str,
    sc: Scenario,
    n: int,
    records: list[TaskRecord],
    gpus: list[MeteredGpu],
    env: FaultyEnv,
    *,
    wall_s: float,
    cpu_s: float,
    rss_kib: float,
    retries: int,
) -> Level:
    k = sc.time_scale
    finishes = sorted(r.finished for r in records)
    w0 = finishes[min(len(finishes) - 1, max(n // 2 - 1, 0))]
    w1 = finishes[min(len(finishes) - 1, (sc.waves - 1) * n - 1)]
    if w1 <= w0:  # a degenerate level (tiny n): use the whole run
        w0, w1 = min(r.started for r in records), finishes[-1]
    steps, model_s, env_s = _turns_between(records, w0, w1, k)
    if not steps:  # too few tasks for a steady window (tiny levels): use the whole run
        w0, w1 = min(r.started for r in records), finishes[-1]
        steps, model_s, env_s = _turns_between(records, w0, w1, k)
    window = w1 - w0
    completed = sum(g.completed_between(w0, w1) for g in gpus)
    busy = sum(g.busy_between(w0, w1) for g in gpus)
    held = env.held_between(w0, w1)
    failed = sum(1 for r in records if r.infra_failed)
    rewards = [r.reward for r in records if r.reward is not None]
    lookups = [g.prefix_hit_rate() for g in gpus]
    scored = [r for r in records if not r.infra_failed and r.turns]
    turns = sum(len(r.turns) for r in scored)
    calls = sum(g.calls for g in gpus)
    return Level(
        system=system,
        concurrency=n,
        tasks=len(records),
        wall_s=wall_s,
        window_s=window / k,
        steps_per_s=completed / (window / k) if window > 0 else 0.0,
        utilisation=busy / (sc.gpu_slots * window) if window > 0 else 0.0,
        mean_step_s=sum(steps) / len(steps) if steps else float("nan"),
        p99_step_s=pct(steps, 99) if steps else float("nan"),
        mean_model_s=sum(model_s) / len(model_s) if model_s else float("nan"),
        mean_env_s=sum(env_s) / len(env_s) if env_s else float("nan"),
        steps_measured=len(steps),
        failed=failed,
        failure_rate=failed / len(records),
        retries=retries,
        faults=env.faults,
        prefix_hit_rate=sum(lookups) / len(lookups),
        env_busy=env.cpu_seconds / (wall_s / k),
        core_wait_s=env.core_wait_s / max(env.ops, 1),
        cpu_share=cpu_s / wall_s,
        rss_per_task_kib=rss_kib / n,
        mean_reward=sum(rewards) / len(rewards) if rewards else float("nan"),
        path=env.path.name,
        path_s_per_op=env.path_s_per_op(),
        overhead_per_step_s=sum(r.overhead_s for r in scored) / turns if turns else float("nan"),
        mean_prompt_tokens=sum(g.prompt_tokens for g in gpus) / calls if calls else float("nan"),
        cores_busy=held / window if window > 0 else float("nan"),
        slot_s_per_call=busy / k / completed if completed else float("nan"),
        core_s_per_call=held / k / completed if completed else float("nan"),
    )


async def megaflow_level(sc: Scenario, n: int, root: Path) -> Level:
    """MegaFlow's three services (embedded) at offered concurrency `n`."""
    gpus, backends = _backends(sc)
    env = FaultyEnv(sc, sc.megaflow_path())
    system = EmbeddedSystem(
        backends=list(backends),
        ledger_path=root / f"megaflow-{n}.sqlite",
        env=env,
        model_config=ModelServiceConfig(
            replica_capacity=max(n, sc.slots_per_replica),  # the GPU model does the queueing
            max_queue=max(10 * n, 10_000),
            deadline_s=3600.0,
        ),
        agent_capacity=n,
    )
    tasks = [generate_task(sc.seed, i) for i in range(sc.waves * n)]
    records: list[TaskRecord] = []
    retries = 0
    gc.collect()
    async with system:
        with _Meter() as meter:
            cpu0, t0 = time.process_time(), time.monotonic()
            reply = await system.scheduler.submit_tasks(
                scheduler_pb2.SubmitTasksRequest(tasks=tasks, max_concurrency=n)
            )
            del tasks
            request = scheduler_pb2.WatchEventsRequest(run_id=reply.run_id)
            async for event in system.scheduler.watch_events(request):
                if event.type == scheduler_pb2.EVENT_TYPE_TASK_RETRYING:
                    retries += 1
                elif event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                    records.append(_megaflow_record(event))
                elif event.type == scheduler_pb2.EVENT_TYPE_RUN_FINISHED:
                    break
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        rss = meter.peak - meter.rss0
    return summarise(
        "MegaFlow", sc, n, records, gpus, env, wall_s=wall, cpu_s=cpu, rss_kib=rss, retries=retries
    )


def _megaflow_record(event: scheduler_pb2.TaskEvent) -> TaskRecord:
    now = time.monotonic()
    result = event.result
    infra = (
        result.state == common_pb2.TASK_STATE_FAILED
        and result.error_kind == common_pb2.ERROR_KIND_INFRA
    )
    record = TaskRecord(
        finished=now,
        started=now - result.duration_s,
        setup_s=result.setup_s,
        infra_failed=infra,
        reward=result.reward if result.has_reward else None,
    )
    if not infra:
        record.turns = [(t.model_latency_s, t.env_latency_s) for t in event.trajectory.turns]
        record.overhead_s = _overhead(result, record.turns)
    return record


class RoundRobinClient:
    """The monolith's model client: each request to the next replica, no affinity."""

    def __init__(self, backends: list[SimulatedBackend]) -> None:
        self._backends = backends
        self._next = itertools.cycle(range(len(backends)))

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        return await self._backends[next(self._next)].generate(request)


async def monolith_level(sc: Scenario, workers: int, mechanism: Mechanism | None = None) -> Level:
    """The monolith with `workers` synchronous workers, each one task at a time,
    reaching its sandboxes through `mechanism` (default: the scenario's headline)."""
    gpus, backends = _backends(sc)
    env = FaultyEnv(sc, sc.monolith_path(mechanism), cores=sc.env_cores)
    model = cast(ModelService, RoundRobinClient(backends))  # the agent only calls generate
    pending = iter(range(sc.waves * workers))
    records: list[TaskRecord] = []
    limits = AgentLimits()

    async def worker() -> None:
        for index in pending:
            task = generate_task(sc.seed, index)
            agent = TaskSession(task, f"{task.task_id}#1", env=env, model=model, limits=limits)
            started = time.monotonic()
            try:
                result, trajectory = await agent.run()
            except InfrastructureError:  # a naive loop: no retry, the task is lost
                records.append(TaskRecord(time.monotonic(), started, 0.0, infra_failed=True))
                continue
            turns = [(t.model_latency_s, t.env_latency_s) for t in trajectory.turns]
            records.append(
                TaskRecord(
                    finished=time.monotonic(),
                    started=started,
                    setup_s=result.setup_s,
                    infra_failed=False,
                    reward=result.reward if result.has_reward else None,
                    turns=turns,
                    overhead_s=_overhead(result, turns),
                )
            )

    gc.collect()
    with _Meter() as meter:
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    rss = meter.peak - meter.rss0
    name = sc.monolith_name(mechanism or sc.monolith_exec)
    return summarise(
        name, sc, workers, records, gpus, env, wall_s=wall, cpu_s=cpu, rss_kib=rss, retries=0
    )
