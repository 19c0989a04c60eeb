"""Scale: how many tasks one process keeps in flight, and what orchestration costs.

The embedded system with the simulated model (a GPU latency model with enough
slots that nothing queues, a realistic time per turn that varies by +-25% from turn to
turn) and the simulated Environment Service (a fixed step latency, no processes), so
that only MegaFlow's own cost is measured. For each level N, N tasks are submitted
by a client ramping up at `RAMP_PER_S` tasks a second (in waves, each its own run),
so that the level is reached in N / RAMP_PER_S seconds and every task is in flight
together before the first finishes.

Per-step orchestration overhead = what the agent measured for a turn's model call and
tool calls, minus what the simulated model and environment were set to take for that
turn (the latency model reports each request's intended service time). It is the
event loop's lateness plus MegaFlow's own code on the path of a step. Memory per
in-flight task = RSS growth at the peak / tasks in flight.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.stats import ms, pct, print_table
from megaflow.core.runtime import GcPauses
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.env.simulated import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.model.latency import GpuLatencyModel, LatencyConfig, Served
from megaflow.model.service import ModelServiceConfig
from megaflow.model.simulated import SimulatedBackend
from megaflow.tasks.swe_synth import generate_task
from megaflow.v1 import scheduler_pb2

TURN_S = 8.0  # model time per turn (+-25%), as for a long-context agent model under load
STEP_S = 2.0  # every environment step and the scoring
RAMP_PER_S = 1_500  # tasks submitted per second by the client
WAVE = 250  # tasks per submission


class _RecordingLatency(GpuLatencyModel):
    """The latency model, keeping each request's intended service time by task and
    prompt size, to subtract from what the agent measured."""

    def __init__(self, config: LatencyConfig) -> None:
        super().__init__(config)
        self.modelled: dict[tuple[str | None, int], float] = {}

    async def serve(
        self, prompt_tokens: int, completion_tokens: int, prefix_key: str | None = None
    ) -> Served:
        served = await super().serve(prompt_tokens, completion_tokens, prefix_key)
        self.modelled[(prefix_key, prompt_tokens)] = served.modelled_s
        return served


@dataclass
class Level:
    tasks: int
    wall_s: float
    steps: int
    peak_in_flight: int
    overhead_p50_s: float
    overhead_p99_s: float
    overhead_max_s: float
    rss_per_task_kib: float
    cpu_share: float
    mean_reward: float
    gc_max_pause_s: float
    gc_pause_share: float


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


async def _level(n: int, root: Path) -> Level:
    latency = _RecordingLatency(
        LatencyConfig(slots=max(n, 64), overhead_s=TURN_S, jitter=0.25, seed=n)
    )
    backend = SimulatedBackend(success_rate=0.8, latency=latency)
    env = SimulatedEnvironmentService(
        SimulatedEnvConfig(step_latency_s=STEP_S, scoring_latency_s=STEP_S)
    )
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=root / f"ledger-{n}.sqlite",
        env=env,
        model_config=ModelServiceConfig(replica_capacity=max(n, 64)),  # one big simulated GPU
        agent_capacity=n,
    )
    waves = [[generate_task(0, i) for i in range(s, min(s + WAVE, n))] for s in range(0, n, WAVE)]
    gc.collect()
    overheads: list[float] = []
    rewards: list[float] = []
    steps = 0
    peak = 0
    async with system:
        pauses = GcPauses()
        rss0 = _rss_kib()
        peak_rss = rss0
        cpu0 = time.process_time()
        t0 = time.perf_counter()

        async def sample() -> None:
            nonlocal peak, peak_rss
            while True:
                peak = max(peak, system.agent.in_flight)
                peak_rss = max(peak_rss, _rss_kib())
                await asyncio.sleep(0.25)

        def record(event: scheduler_pb2.TaskEvent) -> None:
            nonlocal steps
            rewards.append(event.result.reward)
            task_id = event.task_id
            for turn in event.trajectory.turns:
                steps += 1
                modelled = latency.modelled.pop((task_id, turn.prompt_tokens), 0.0)
                modelled += STEP_S * len(turn.observations)
                overheads.append(max(turn.model_latency_s + turn.env_latency_s - modelled, 0.0))

        async def watch(run_id: str) -> None:
            request = scheduler_pb2.WatchEventsRequest(run_id=run_id)
            async for event in system.scheduler.watch_events(request):
                if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                    record(event)

        sampler = asyncio.create_task(sample())
        watchers = []
        for i, wave in enumerate(waves):
            await asyncio.sleep(max(t0 + i * WAVE / RAMP_PER_S - time.perf_counter(), 0.0))
            reply = await system.scheduler.submit_tasks(
                scheduler_pb2.SubmitTasksRequest(tasks=wave)
            )
            watchers.append(asyncio.create_task(watch(reply.run_id)))
        del waves
        await asyncio.gather(*watchers)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        sampler.cancel()
        pauses.close()
    return Level(
        tasks=n,
        wall_s=wall,
        steps=steps,
        peak_in_flight=peak,
        overhead_p50_s=pct(overheads, 50),
        overhead_p99_s=pct(overheads, 99),
        overhead_max_s=max(overheads),
        rss_per_task_kib=(peak_rss - rss0) / max(peak, 1),
        cpu_share=cpu / wall,
        mean_reward=sum(rewards) / len(rewards),
        gc_max_pause_s=pauses.max_s,
        gc_pause_share=pauses.total_s / wall,
    )


def _check(level: Level) -> None:
    if level.mean_reward <= 0 or not level.steps:
        raise RuntimeError(f"level {level.tasks}: no task was scored ({level})")


async def run(quick: bool = False, levels: tuple[int, ...] | None = None) -> dict[str, float]:
    chosen = levels or ((1_000, 5_000) if quick else (1_000, 10_000, 20_000, 30_000))
    results = []
    with tempfile.TemporaryDirectory(prefix="megaflow-scale-") as tmp:
        for n in chosen:
            results.append(await _level(n, Path(tmp)))
            _check(results[-1])
    print_table(
        f"scale, embedded: simulated model ({TURN_S:.0f} s/turn +-25%), "
        f"simulated env ({STEP_S:.0f} s/step), ramp {RAMP_PER_S:,} tasks/s",
        [
            (
                f"{r.tasks:,}",
                f"{r.peak_in_flight:,}",
                f"{r.steps / r.wall_s:,.0f}",
                ms(r.overhead_p50_s),
                ms(r.overhead_p99_s),
                ms(r.overhead_max_s),
                f"{r.rss_per_task_kib:.0f} KiB",
                f"{r.cpu_share:.0%}",
                f"{r.gc_pause_share:.1%} / {r.gc_max_pause_s * 1000:.0f} ms",
                f"{r.wall_s:.1f} s",
                f"{r.mean_reward:.3f}",
            )
            for r in results
        ],
        (
            "tasks",
            "peak in flight",
            "steps/s",
            "overhead p50",
            "p99",
            "max",
            "mem/task",
            "CPU",
            "GC time / worst",
            "wall",
            "reward",
        ),
    )
    top = results[-1]
    return {
        "max_in_flight": float(top.peak_in_flight),
        "steps_per_s": top.steps / top.wall_s,
        "overhead_p50_ms": top.overhead_p50_s * 1000,
        "overhead_p99_ms": top.overhead_p99_s * 1000,
        "rss_per_task_kib": top.rss_per_task_kib,
    }
