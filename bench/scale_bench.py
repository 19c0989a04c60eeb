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

The multi-process mode runs the same parts as four processes over gRPC (`megaflow
serve scheduler` and `agent`, and the simulated model and environment of
`bench.scale_services`), without jitter so that the intended model time of a turn
follows from its token counts; CPU is summed over the four processes and memory is
the Agent Service's.

Every level runs on the allocator MegaFlow's processes use (`python -m bench`
preloads jemalloc like `megaflow` does, `megaflow.core.allocator`); the largest
embedded level is run once more in a fresh process on glibc's malloc
(`MEGAFLOW_MALLOC=system`), to show what the allocator is worth.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.stats import ms, pct, print_table
from megaflow.agent.checkpoint import CheckpointConfig
from megaflow.contract import SchedulerService
from megaflow.core.allocator import ENV as ALLOCATOR_ENV
from megaflow.core.allocator import current as current_allocator
from megaflow.core.allocator import preload
from megaflow.core.runtime import GcPauses
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.model.latency import GpuLatencyModel, LatencyConfig, Served
from megaflow.model.service import ModelServiceConfig
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.tasks.swe_synth import generate_task
from megaflow.testing.processes import ServiceProcess
from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, scheduler_pb2

# Model time per turn (+-25%): the seed's 30,000 agents on 128 GPUs are ~230 sequences
# a GPU, where a long-context agent turn (prefill + a few hundred tokens) takes ~20 s.
TURN_S = 20.0
STEP_S = 5.0  # every environment step (commands, test runs) and the scoring
RAMP_PER_S = 1_000  # tasks submitted per second by the client
WAVE = 25  # tasks per submission (a submission starts its tasks in one burst)
_SERVICES = "bench.scale_services"  # the simulated model and env as processes


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


def _rss_kib(pid: int | None = None) -> int:
    """Resident memory of ``pid`` (default: this process), KiB."""
    return int(psutil.Process(pid).memory_info().rss) // 1024


class _Driver:
    """Ramps `n` tasks into a scheduler in waves and measures every finished turn."""

    def __init__(
        self,
        scheduler: SchedulerService,
        modelled: Callable[[str, common_pb2.Turn], float],
        in_flight: Callable[[], Awaitable[int]],
    ) -> None:
        self.scheduler = scheduler
        self.modelled = modelled
        self.in_flight = in_flight
        self.overheads: list[float] = []
        self.rewards: list[float] = []
        self.steps = 0
        self.peak = 0

    def _record(self, event: scheduler_pb2.TaskEvent) -> None:
        self.rewards.append(event.result.reward)
        for turn in event.trajectory.turns:
            self.steps += 1
            modelled = self.modelled(event.task_id, turn) + STEP_S * len(turn.observations)
            self.overheads.append(max(turn.model_latency_s + turn.env_latency_s - modelled, 0.0))

    async def _watch(self, run_id: str) -> None:
        request = scheduler_pb2.WatchEventsRequest(run_id=run_id)
        async for event in self.scheduler.watch_events(request):
            if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                self._record(event)
            elif event.type == scheduler_pb2.EVENT_TYPE_RUN_FINISHED:
                return

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, await self.in_flight())
            await asyncio.sleep(0.25)

    async def run(self, waves: list[list[common_pb2.TaskSpec]]) -> float:
        """Submit the waves at RAMP_PER_S; the wall time until the last result."""
        t0 = time.perf_counter()
        sampler = asyncio.create_task(self._sample())
        watchers = []
        for i, wave in enumerate(waves):
            await asyncio.sleep(max(t0 + i * WAVE / RAMP_PER_S - time.perf_counter(), 0.0))
            reply = await self.scheduler.submit_tasks(scheduler_pb2.SubmitTasksRequest(tasks=wave))
            watchers.append(asyncio.create_task(self._watch(reply.run_id)))
        waves.clear()
        await asyncio.gather(*watchers)
        wall = time.perf_counter() - t0
        sampler.cancel()
        return wall

    def level(self, n: int, wall: float, cpu: float, rss_kib: float, gc: GcPauses | None) -> Level:
        return Level(
            tasks=n,
            wall_s=wall,
            steps=self.steps,
            peak_in_flight=self.peak,
            overhead_p50_s=pct(self.overheads, 50),
            overhead_p99_s=pct(self.overheads, 99),
            overhead_max_s=max(self.overheads),
            rss_per_task_kib=rss_kib / max(self.peak, 1),
            cpu_share=cpu / wall,
            mean_reward=sum(self.rewards) / max(len(self.rewards), 1),
            gc_max_pause_s=gc.max_s if gc else float("nan"),
            gc_pause_share=gc.total_s / wall if gc else float("nan"),
        )


def _waves(n: int) -> list[list[common_pb2.TaskSpec]]:
    return [[generate_task(0, i) for i in range(s, min(s + WAVE, n))] for s in range(0, n, WAVE)]


async def _embedded(n: int, root: Path, checkpoint_every: int = 1) -> Level:
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
        checkpoints=CheckpointConfig(every_turns=checkpoint_every),
    )
    waves = _waves(n)
    gc.collect()

    async def in_flight() -> int:
        return system.agent.in_flight

    def modelled(task_id: str, turn: common_pb2.Turn) -> float:
        return latency.modelled.pop((task_id, turn.prompt_tokens), 0.0)

    async with system:
        driver = _Driver(system.scheduler, modelled, in_flight)
        pauses = GcPauses()
        rss0 = _rss_kib()
        peak_rss = rss0

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, _rss_kib())
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        cpu0 = time.process_time()
        wall = await driver.run(waves)
        cpu = time.process_time() - cpu0
        sampler.cancel()
        pauses.close()
    return driver.level(n, wall, cpu, peak_rss - rss0, pauses)


def _proc_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _processes(n: int, root: Path) -> Level:
    config = LatencyConfig(slots=max(n, 64), overhead_s=TURN_S)
    procs: list[ServiceProcess] = []
    client: SchedulerServiceClient | None = None
    try:
        sched = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(root / f"procs-{n}.sqlite")
        ).start()
        procs.append(sched)
        for kind, args, module in (
            ("model", ("--turn-s", str(TURN_S), "--slots", str(config.slots)), _SERVICES),
            ("env", ("--step-s", str(STEP_S), "--capacity", str(n)), _SERVICES),
            ("agent", ("--capacity", str(n)), "megaflow.cli"),
        ):
            procs.append(
                ServiceProcess(kind, "--scheduler", sched.address, *args, module=module).start()
            )
        client = SchedulerServiceClient(sched.address)
        for _ in range(100):  # until all three have registered
            if len((await client.status(scheduler_pb2.StatusRequest())).services) >= 3:
                break
            await asyncio.sleep(0.1)
        agent_pid = procs[-1].pid
        status_client = client

        async def in_flight() -> int:
            return (await status_client.status(scheduler_pb2.StatusRequest())).running

        def modelled(task_id: str, turn: common_pb2.Turn) -> float:
            return (
                config.overhead_s
                + config.prefill_s_per_token * turn.prompt_tokens
                + config.decode_s_per_token * turn.completion_tokens
            )

        driver = _Driver(client, modelled, in_flight)
        waves = _waves(n)
        rss0 = _rss_kib(agent_pid)
        peak_rss = rss0

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, _rss_kib(agent_pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        cpu0 = sum(_proc_cpu_s(p.pid) for p in procs)
        wall = await driver.run(waves)
        cpu = sum(_proc_cpu_s(p.pid) for p in procs) - cpu0
        sampler.cancel()
        return driver.level(n, wall, cpu, peak_rss - rss0, None)
    finally:
        if client is not None:
            await client.close()
        for proc in reversed(procs):
            proc.stop()


def _embedded_elsewhere(n: int, allocator: str) -> Level:
    """`_embedded(n)` in a fresh process on the chosen allocator (`MEGAFLOW_MALLOC`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale_bench", str(n)],
        env={**os.environ, ALLOCATOR_ENV: allocator},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"level {n} on {allocator} failed: {proc.stderr[-2000:]}")
    return Level(**json.loads(proc.stdout.splitlines()[-1]))


def _check(level: Level) -> None:
    if level.mean_reward <= 0 or not level.steps:
        raise RuntimeError(f"level {level.tasks}: no task was scored ({level})")


async def run(
    quick: bool = False,
    levels: tuple[int, ...] | None = None,
    proc_levels: tuple[int, ...] | None = None,
    glibc_levels: tuple[int, ...] | None = None,
) -> dict[str, float]:
    chosen = levels or ((1_000, 5_000) if quick else (1_000, 10_000, 30_000))
    chosen_procs = (
        proc_levels if proc_levels is not None else ((1_000,) if quick else (1_000, 5_000))
    )
    allocator = current_allocator()
    results: list[tuple[str, str, Level]] = []
    with tempfile.TemporaryDirectory(prefix="megaflow-scale-") as tmp:
        for n in chosen:
            results.append(("embedded", allocator, await _embedded(n, Path(tmp))))
            _check(results[-1][2])
        if glibc_levels is None:
            glibc_levels = () if quick or allocator != "jemalloc" else (max(chosen),)
        for n in glibc_levels:  # the same level on glibc's allocator, for comparison
            results.append(("embedded", "glibc malloc", _embedded_elsewhere(n, "system")))
            _check(results[-1][2])
        for n in chosen_procs:
            results.append(("4 processes, gRPC", allocator, await _processes(n, Path(tmp))))
            _check(results[-1][2])
    print_table(
        f"scale: simulated model ({TURN_S:.0f} s/turn, +-25% embedded), "
        f"simulated env ({STEP_S:.0f} s/step), ramp {RAMP_PER_S:,} tasks/s",
        [
            (
                mode,
                alloc,
                f"{r.tasks:,}",
                f"{r.peak_in_flight:,}",
                f"{r.steps / r.wall_s:,.0f}",
                ms(r.overhead_p50_s),
                ms(r.overhead_p99_s),
                ms(r.overhead_max_s),
                f"{r.rss_per_task_kib:.0f} KiB",
                f"{r.cpu_share:.2f}",
                "-"
                if r.gc_max_pause_s != r.gc_max_pause_s
                else f"{r.gc_pause_share:.1%} / {r.gc_max_pause_s * 1000:.0f} ms",
                f"{r.wall_s:.1f} s",
                f"{r.mean_reward:.3f}",
            )
            for mode, alloc, r in results
        ],
        (
            "mode",
            "allocator",
            "tasks",
            "peak in flight",
            "steps/s",
            "overhead p50",
            "p99",
            "max",
            "mem/task",
            "CPU (cores)",
            "GC time / worst",
            "wall",
            "reward",
        ),
    )
    figures: dict[str, float] = {}
    for mode, alloc, r in results:
        key = "embedded" if mode == "embedded" else "processes"
        if alloc != allocator:
            key += "_glibc"
        figures[f"{key}_{r.tasks}_peak_in_flight"] = float(r.peak_in_flight)
        figures[f"{key}_{r.tasks}_steps_per_s"] = r.steps / r.wall_s
        figures[f"{key}_{r.tasks}_overhead_p50_ms"] = r.overhead_p50_s * 1000
        figures[f"{key}_{r.tasks}_overhead_p99_ms"] = r.overhead_p99_s * 1000
        figures[f"{key}_{r.tasks}_rss_per_task_kib"] = r.rss_per_task_kib
    return figures


if __name__ == "__main__":  # one embedded level, its figures as JSON (_embedded_elsewhere)
    preload()
    with tempfile.TemporaryDirectory(prefix="megaflow-scale-") as _tmp:
        _level = asyncio.run(_embedded(int(sys.argv[1]), Path(_tmp)))
    print(json.dumps(dataclasses.asdict(_level)))
