"""Chaos benchmark: 500 tasks on a live multi-process deployment under repeated kill -9s
of the scheduler, an agent, an env and a model replica, sandboxes killed and sandboxes
hung (`--quick`: 120 tasks, one of each); on the SQLite store, then on redis-server.
Prints the schedule, the checks and the figures (see megaflow.testing.chaos)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from pathlib import Path
from typing import Any

from megaflow.testing.chaos import ChaosConfig, ChaosStopped, format_report, report, run_chaos
from megaflow.testing.redis_server import redis_available


async def _one(config: ChaosConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="megaflow-chaos-") as tmp:
        stop = threading.Event()
        job = asyncio.ensure_future(asyncio.to_thread(run_chaos, Path(tmp) / "chaos", config, stop))
        try:
            figures = await asyncio.shield(job)
        except asyncio.CancelledError:  # Ctrl-C, SIGTERM: stop the deployment, then go
            print("chaos: stopping the deployment...", flush=True)
            stop.set()
            with contextlib.suppress(ChaosStopped):
                await job
            raise
        figures_of = report(figures)  # reads the run's files: before they go
        print(
            f"\n== chaos on {config.store}: {config.tasks} tasks, {config.kills_per_kind} "
            f"kill(s) of each service kind, {config.sandbox_faults} sandbox kill(s) and "
            f"hang(s) =="
        )
        print(format_report(figures))
    problems = figures["problems"]
    print("checks:", "all passed" if not problems else "\n  ".join(["FAILED", *problems]))
    return {**figures_of, "problems": problems, "events": figures["events"]}


async def run(quick: bool = False) -> dict[str, Any]:
    stores = ["sqlite"] if redis_available() else ["sqlite", "redis"]
    results = {}
    for store in stores:
        config = ChaosConfig(
            tasks=120 if quick else 500,
            concurrency=16,
            seed=1,
            kills_per_kind=1 if quick else 3,
            sandbox_faults=1 if quick else 3,
            window=(0.05, 0.5),
            min_gap=1,
            run_timeout_s=900,
            store=store,  # type: ignore[arg-type]
        )
        results[store] = await _one(config)
    return results
