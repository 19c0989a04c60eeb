"""Level-1 packing: warm-pool hit rate of image-aware placement against the baselines.

Four in-process `SimulatedEnvironmentService`s act as env hosts `node0..node3:7001`,
each beside an Agent Service `nodeH:7000`, all behind the real scheduler shell (one
`SchedulerServiceImpl`, services registered under distinct addresses, resolved to the
local implementations). Host H keeps a warm pool of `WARM` sandboxes for each image I
with I % 4 == H (two of the eight images), refilled when a sandbox is released; a
warm claim takes `WARM_S`, a cold create `COLD_S`. The same stream of tasks, with a
skewed (Zipf) image mix, runs through the scheduler once per placement strategy:
'packing' (level 1), 'least_loaded' and 'random'. Reported: the warm-pool hit rate
(warm claims / creates, counted by the env hosts), the mean and p99 task start
latency (sandbox setup as measured by the agent), how often the agent loop ran on
its environment's node, and the wall time.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.stats import ms, pct, print_table
from megaflow.agent.service import AgentServiceImpl
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler import state as s
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_task
from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, scheduler_pb2

IMAGES = 8
HOSTS = 4
WARM = 4  # warm sandboxes per (host, image) pool
HOST_CAPACITY = 8
CONCURRENCY = 24  # the run's cap, below the hosts' 32 so that placement has a choice
COLD_S = 0.050
WARM_S = 0.001
STEP_S = 0.004
STRATEGIES = ("packing", "least_loaded", "random")


@dataclass
class Outcome:
    strategy: str
    tasks: int
    hit_rate: float
    start_mean_s: float
    start_p99_s: float
    colocated: float
    wall_s: float
    infra_failed: int


def _images(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(IMAGES)]  # image 0 is ~37% of the tasks
    return [f"img{k}" for k in rng.choices(range(IMAGES), weights, k=n)]


async def _run(strategy: str, n: int, root: Path) -> Outcome:
    resolver = ServiceResolver()
    model = ModelServiceImpl([SimulatedBackend.fast(success_rate=0.8, slots=256)])
    resolver.set_local("model", model)
    envs: list[SimulatedEnvironmentService] = []
    agents: list[AgentServiceImpl] = []
    scheduler = SchedulerServiceImpl(
        SqliteLedger(root / f"ledger-{strategy}.sqlite"),
        resolver,
        policy=s.SchedulerPolicy(placement=strategy, seed=1),
    )
    for h in range(HOSTS):
        warm = {f"img{i}": WARM for i in range(IMAGES) if i % HOSTS == h}
        env = SimulatedEnvironmentService(
            SimulatedEnvConfig(
                create_latency_s=COLD_S,
                warm_claim_latency_s=WARM_S,
                step_latency_s=STEP_S,
                max_environments=HOST_CAPACITY,
                warm_pool=warm,
            )
        )
        agent = AgentServiceImpl(resolver, capacity=1000)
        resolver.set_local("env", env, address=f"node{h}:7001")
        resolver.set_local("agent", agent, address=f"node{h}:7000")
        envs.append(env)
        agents.append(agent)
    colocated = dispatched = 0
    handle = scheduler.state.handle

    def counting(event: s.Event, now: float | None = None) -> list[s.Instruction]:
        nonlocal colocated, dispatched
        out = handle(event, now)
        for i in out:
            if isinstance(i, s.Dispatch):
                dispatched += 1
                colocated += i.agent.rpartition(":")[0] == i.env.rpartition(":")[0]
        return out

    scheduler.state.handle = counting  # type: ignore[method-assign]
    for service in (model, *envs, *agents):
        await service.start()
    await scheduler.start()
    try:
        scheduler.register_local(s.KIND_MODEL, 10_000)
        for h, env in enumerate(envs):
            scheduler.register_local(
                s.KIND_ENV, HOST_CAPACITY, address=f"node{h}:7001", resources=env.advertised()
            )
            scheduler.register_local(s.KIND_AGENT, 1000, address=f"node{h}:7000")
        tasks = []
        for i, image in enumerate(_images(n)):
            task = generate_task(0, i)
            task.image = image
            tasks.append(task)
        t0 = time.perf_counter()
        reply = await scheduler.submit_tasks(
            scheduler_pb2.SubmitTasksRequest(tasks=tasks, max_concurrency=CONCURRENCY)
        )
        starts: list[float] = []
        infra = 0
        async for event in scheduler.watch_events(
            scheduler_pb2.WatchEventsRequest(run_id=reply.run_id)
        ):
            if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                starts.append(event.result.setup_s)
                infra += event.result.error_kind == common_pb2.ERROR_KIND_INFRA
        wall = time.perf_counter() - t0
    finally:
        await scheduler.stop()
        for service in (*agents, *envs, model):
            await service.stop()
        await resolver.close()
    hits = sum(env.warm_hits for env in envs)
    created = sum(env.created for env in envs)
    return Outcome(
        strategy=strategy,
        tasks=n,
        hit_rate=hits / created,
        start_mean_s=sum(starts) / len(starts),
        start_p99_s=pct(starts, 99),
        colocated=colocated / max(dispatched, 1),
        wall_s=wall,
        infra_failed=infra,
    )


async def run(quick: bool = False) -> dict[str, object]:
    n = 240 if quick else 1200
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="megaflow-packing-") as tmp:
        for strategy in STRATEGIES:
            outcomes.append(await _run(strategy, n, Path(tmp)))
    print_table(
        f"level-1 packing: {n} tasks, {IMAGES} images (Zipf), {HOSTS} env hosts x "
        f"{HOST_CAPACITY}, warm pools of {WARM} for 2 images per host, run cap {CONCURRENCY}",
        [
            (
                o.strategy,
                f"{o.hit_rate:.1%}",
                ms(o.start_mean_s),
                ms(o.start_p99_s),
                f"{o.colocated:.0%}",
                f"{o.wall_s:.2f} s",
                str(o.infra_failed),
            )
            for o in outcomes
        ],
        (
            "placement",
            "warm hit rate",
            "start mean",
            "start p99",
            "agent co-located",
            "wall",
            "infra failures",
        ),
    )
    return {o.strategy: asdict(o) for o in outcomes}
