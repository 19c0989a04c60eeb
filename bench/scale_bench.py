"""Scale: how many tasks one process keeps in flight, and what orchestration costs.

The embedded system with the simulated model (a GPU latency model with enough
slots that nothing queues, and a realistic fixed time per turn) and the simulated
Environment Service (a fixed step latency, no processes), so that only MegaFlow's
own cost is measured. For each level N, N tasks are submitted at once with no cap.

Per-step orchestration overhead = what the agent measured for a turn's model call
and tool calls, minus what the simulated model and environment were configured to
take for that turn. Memory per in-flight task = peak RSS growth / N.
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
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.env.simulated import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.service import ModelServiceConfig
from megaflow.model.simulated import SimulatedBackend
from megaflow.tasks.swe_synth import generate_task
from megaflow.v1 import common_pb2, scheduler_pb2

TURN_S = 2.0  # fixed model time per turn (plus per-token prefill/decode below)
STEP_S = 0.5  # every environment step and the scoring


@dataclass
class Level:
    tasks: int
    wall_s: float
    steps: int
    peak_in_flight: int
    overhead_p50_s: float
    overhead_p99_s: float
    rss_per_task_kib: float
    cpu_share: float
    mean_reward: float


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _modelled_model_s(config: LatencyConfig, turn: common_pb2.Turn) -> float:
    return config.time_scale * (
        config.overhead_s
        + config.prefill_s_per_token * turn.prompt_tokens
        + config.decode_s_per_token * turn.completion_tokens
    )


async def _level(n: int, root: Path) -> Level:
    latency = LatencyConfig(slots=max(n, 64), overhead_s=TURN_S)
    backend = SimulatedBackend(success_rate=0.8, latency=GpuLatencyModel(latency))
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
    tasks = [generate_task(0, i) for i in range(n)]
    gc.collect()
    overheads: list[float] = []
    rewards: list[float] = []
    steps = 0
    peak = 0
    async with system:
        rss0 = _rss_kib()
        peak_rss = rss0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        reply = await system.scheduler.submit_tasks(scheduler_pb2.SubmitTasksRequest(tasks=tasks))
        del tasks

        async def sample() -> None:
            nonlocal peak, peak_rss
            while True:
                peak = max(peak, system.agent.in_flight)
                peak_rss = max(peak_rss, _rss_kib())
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        request = scheduler_pb2.WatchEventsRequest(run_id=reply.run_id)
        async for event in system.scheduler.watch_events(request):
            if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                rewards.append(event.result.reward)
                for turn in event.trajectory.turns:
                    steps += 1
                    modelled = _modelled_model_s(latency, turn) + STEP_S * len(turn.observations)
                    overheads.append(max(turn.model_latency_s + turn.env_latency_s - modelled, 0.0))
            elif event.type == scheduler_pb2.EVENT_TYPE_RUN_FINISHED:
                break
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        sampler.cancel()
    return Level(
        tasks=n,
        wall_s=wall,
        steps=steps,
        peak_in_flight=peak,
        overhead_p50_s=pct(overheads, 50),
        overhead_p99_s=pct(overheads, 99),
        rss_per_task_kib=(peak_rss - rss0) / max(peak, 1),
        cpu_share=cpu / wall,
        mean_reward=sum(rewards) / len(rewards),
    )


async def run(quick: bool = False, levels: tuple[int, ...] | None = None) -> dict[str, float]:
    chosen = levels or ((500, 2_000) if quick else (1_000, 5_000, 10_000, 30_000))
    results = []
    with tempfile.TemporaryDirectory(prefix="megaflow-scale-") as tmp:
        for n in chosen:
            results.append(await _level(n, Path(tmp)))
    print_table(
        f"scale, embedded: simulated model ({TURN_S:.0f} s/turn + tokens), "
        f"simulated env ({STEP_S} s/step)",
        [
            (
                f"{r.tasks:,}",
                f"{r.peak_in_flight:,}",
                f"{r.steps / r.wall_s:,.0f}",
                ms(r.overhead_p50_s),
                ms(r.overhead_p99_s),
                f"{r.rss_per_task_kib:.0f} KiB",
                f"{r.cpu_share:.0%}",
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
            "mem/task",
            "CPU",
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
