"""Chaos benchmark: 500 tasks on a live multi-process deployment under repeated kill -9s
of the scheduler, an agent, an env and a model replica (`--quick`: 120 tasks, one of
each); prints the schedule, the checks and the figures (see megaflow.testing.chaos)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from megaflow.testing.chaos import ChaosConfig, check_all, format_report, report, run_chaos


async def run(quick: bool = False) -> dict[str, Any]:
    config = ChaosConfig(
        tasks=120 if quick else 500,
        concurrency=32,
        seed=1,
        kills_per_kind=1 if quick else 3,
        window=(0.05, 0.55),
        min_gap=1,
        run_timeout_s=900,
    )
    with tempfile.TemporaryDirectory(prefix="megaflow-chaos-") as tmp:
        figures = await asyncio.to_thread(run_chaos, Path(tmp) / "chaos", config)
        problems = check_all(figures)
        figures_of = report(figures)  # reads the run's files: before they go
        print(f"\n== chaos: {config.tasks} tasks, {config.kills_per_kind} kill(s) of each kind ==")
        print(format_report(figures))
    print("checks:", "all passed" if not problems else "\n  ".join(["FAILED", *problems]))
    return {**figures_of, "problems": problems, "events": figures["events"]}
