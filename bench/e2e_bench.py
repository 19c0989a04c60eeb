"""End to end: synthetic tasks with the simulated model, embedded vs four processes.

Reports tasks/s, steps/s, the simulated GPU's utilisation and the orchestration
overhead per step: the time of a task that is neither a model call, nor an
environment call, nor sandbox setup or release, as the agent measures them, divided
by its steps. (Scheduler queueing before a task starts is not in it.)
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from bench.stats import ms, pct, print_table
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.service import EnvServiceConfig
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.processes import ServiceProcess
from megaflow.testing.simulated_model import SimulatedBackend

TIME_SCALE = 0.25  # the simulated GPU at a quarter of its modelled latency


def _overheads(out: Path, summary: RunSummary) -> list[float]:
    samples = []
    for line in (out / "trajectories.jsonl").read_text().splitlines():
        trajectory = json.loads(line)
        turns = trajectory.get("turns", [])
        record = next(r for r in summary.records if r["task_id"] == trajectory["task_id"])
        spent = sum(t.get("model_latency_s", 0) + t.get("env_latency_s", 0) for t in turns)
        spent += record["setup_s"] + record["teardown_s"]
        if turns:
            samples.append(max(record["duration_s"] - spent, 0.0) / len(turns))
    return samples


async def _embedded(n: int, concurrency: int, root: Path) -> tuple[RunSummary, float, list[float]]:
    backend = SimulatedBackend(
        success_rate=0.8, latency=GpuLatencyModel(LatencyConfig(time_scale=TIME_SCALE))
    )
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=root / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=root / "sb", max_environments=concurrency),
    )
    async with system:
        summary = await run_batch(
            system.scheduler, generate_tasks(n), root / "out", max_concurrency=concurrency
        )
        utilisation = backend.stats().utilisation
    return summary, utilisation, _overheads(root / "out", summary)


async def _processes(n: int, concurrency: int, root: Path) -> tuple[RunSummary, list[float]]:
    procs: list[ServiceProcess] = []
    try:
        sched = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(root / "l.sqlite")
        )
        procs.append(sched.start())
        for kind, args in (
            ("model", ("--time-scale", str(TIME_SCALE))),
            ("env", ("--sandbox-dir", str(root / "sb"), "--capacity", str(concurrency))),
            ("agent", ()),
        ):
            procs.append(ServiceProcess(kind, "--scheduler", sched.address, *args).start())
        client = SchedulerServiceClient(sched.address)
        await asyncio.sleep(0.5)  # registrations land
        summary = await run_batch(
            client, generate_tasks(n), root / "out", max_concurrency=concurrency
        )
        await client.close()
        return summary, _overheads(root / "out", summary)
    finally:
        for proc in reversed(procs):
            proc.stop()


async def run(quick: bool = False) -> dict[str, float]:
    n, concurrency = (32, 16) if quick else (128, 32)
    with tempfile.TemporaryDirectory(prefix="megaflow-bench-") as tmp:
        root = Path(tmp)
        emb, utilisation, emb_over = await _embedded(n, concurrency, root / "embedded")
        proc, proc_over = await _processes(n, concurrency, root / "processes")
    emb_s, proc_s = emb.wall_s, proc.wall_s  # submit → last result, start-up excluded
    emb_steps = sum(r["steps"] for r in emb.records)
    proc_steps = sum(r["steps"] for r in proc.records)
    rows = [
        (
            "embedded (1 process)",
            f"{n / emb_s:.1f}",
            f"{emb_steps / emb_s:.1f}",
            ms(pct(emb_over, 50)),
            ms(pct(emb_over, 99)),
            f"{emb.mean_reward:.3f}",
        ),
        (
            "processes (4, gRPC)",
            f"{n / proc_s:.1f}",
            f"{proc_steps / proc_s:.1f}",
            ms(pct(proc_over, 50)),
            ms(pct(proc_over, 99)),
            f"{proc.mean_reward:.3f}",
        ),
    ]
    print_table(
        f"end to end: {n} tasks, concurrency {concurrency}, simulated GPU x{TIME_SCALE} latency "
        f"(embedded GPU utilisation {utilisation:.0%})",
        rows,
        ("deployment", "tasks/s", "steps/s", "overhead/step p50", "p99", "mean reward"),
    )
    return {
        "embedded_tasks_per_s": n / emb_s,
        "processes_tasks_per_s": n / proc_s,
        "embedded_overhead_p99_ms": pct(emb_over, 99) * 1000,
        "processes_overhead_p99_ms": pct(proc_over, 99) * 1000,
    }
