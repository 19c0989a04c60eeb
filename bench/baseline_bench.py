"""MegaFlow against a monolithic single-service baseline, in one run (issue 5, item 8).

Both systems ramp over offered concurrency on the same simulated GPU, the same task
mix and the same injected environment faults; each one's max sustainable concurrency,
mean step latency, GPU utilisation and failure rate go into a table, PNG plots and
`docs/baseline.md`. The model and its assumptions: `bench/baseline/` and the report.

`--quick` runs a small scenario (2 GPUs x 16 slots, a few levels) and writes its
report under a temporary directory, so the committed report is only ever a full run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.baseline import markdown
from bench.baseline.report import Outcome, headline, judge, plots
from bench.baseline.scenario import QUICK, Scenario
from bench.baseline.sides import Level, megaflow_level, monolith_level
from bench.stats import print_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


async def _ramp(
    sc: Scenario, outcome: Outcome, levels: tuple[int, ...], root: Path, *, megaflow: bool
) -> None:
    for n in levels:
        if n > outcome.memory_cap:
            break  # the node cannot hold it: not run
        if megaflow:
            level = await megaflow_level(sc, n, root)
        else:
            level = await monolith_level(sc, n)
        outcome.levels.append(level)
        previous = outcome.levels[-2] if len(outcome.levels) > 1 else None
        judge(level, previous, sc, outcome.memory_cap)
        print(
            f"  {outcome.system:>9} N={n:>6,}: {level.steps_per_s:8,.0f} steps/s, "
            f"step {level.mean_step_s * 1000:5.0f} ms (p99 {level.p99_step_s * 1000:5.0f}), "
            f"GPU {level.utilisation:6.1%}, failed {level.failure_rate:5.1%}, "
            f"CPU {level.cpu_share:4.0%}, {level.wall_s:4.0f} s"
            + ("" if level.sustainable else f"  -- not sustainable: {level.why_not}"),
            flush=True,
        )
        if level.sustainable:
            outcome.best = level
        else:
            break


async def compare(
    sc: Scenario, root: Path, *, equal_concurrency: bool = True
) -> tuple[Outcome, Outcome, Level | None]:
    """Ramp both systems; also MegaFlow at the monolith's max concurrency."""
    mono_mib = sc.worker_mib + sc.sandbox_mib
    baseline = Outcome("monolith", [], mono_mib, sc.memory_cap(mono_mib))
    await _ramp(sc, baseline, sc.baseline_levels, root, megaflow=False)
    # MegaFlow's per-task memory is measured: a first level tells it (re-judged below).
    megaflow = Outcome("MegaFlow", [], 0.0, 1 << 62)
    await _ramp(sc, megaflow, sc.megaflow_levels, root, megaflow=True)
    if megaflow.levels:
        top = max(megaflow.levels, key=lambda lv: lv.concurrency)
        megaflow.per_task_mib = top.rss_per_task_kib / 1024 + sc.sandbox_mib
        megaflow.memory_cap = sc.memory_cap(megaflow.per_task_mib)
        megaflow.best = None
        for i, level in enumerate(megaflow.levels):
            judge(level, megaflow.levels[i - 1] if i else None, sc, megaflow.memory_cap)
            if not level.sustainable:
                break
            megaflow.best = level
    equal = None
    if equal_concurrency and baseline.best is not None:
        same = [lv for lv in megaflow.levels if lv.concurrency == baseline.best.concurrency]
        equal = same[0] if same else await megaflow_level(sc, baseline.best.concurrency, root)
    return baseline, megaflow, equal


async def run(
    quick: bool = False, scenario: Scenario | None = None, docs_dir: Path | None = None
) -> dict[str, float]:
    sc = scenario or (QUICK if quick else Scenario())
    if docs_dir is None:
        docs_dir = Path(tempfile.mkdtemp(prefix="megaflow-baseline-")) if quick else DOCS
    load_before = _load()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="megaflow-baseline-") as tmp:
        baseline, megaflow, equal = await compare(sc, Path(tmp))
    wall = time.monotonic() - t0
    columns, rows = headline(baseline, megaflow)
    print_table(
        f"MegaFlow vs monolith: {sc.gpu_slots:,} simulated GPU slots, "
        f"faults {sc.fault_rate:.1%}/op, x{sc.time_scale:g} time",
        rows,
        columns,
    )
    images = plots([baseline, megaflow], docs_dir / "baseline", sc.sla_p99_step_s, equal)
    report = docs_dir / "baseline.md"
    markdown.write(
        report,
        sc,
        baseline,
        megaflow,
        equal,
        quick=quick,
        wall_s=wall,
        load=(load_before, _load()),
        plot_names=[p.name for p in images],
    )
    print(f"report: {report} (plots in {docs_dir / 'baseline'}); {wall:.0f} s")
    figures: dict[str, float] = {"wall_s": wall}
    for out in (baseline, megaflow):
        if out.best is not None:
            key = out.system.lower()
            figures[f"{key}_max_concurrency"] = float(out.best.concurrency)
            figures[f"{key}_mean_step_ms"] = out.best.mean_step_s * 1000
            figures[f"{key}_gpu_utilisation"] = out.best.utilisation
            figures[f"{key}_failure_rate"] = out.best.failure_rate
    return figures
