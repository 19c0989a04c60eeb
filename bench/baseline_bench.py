"""MegaFlow against a monolithic single-service baseline, in one run (issue 5, item 8).

Both systems ramp over offered concurrency on the same simulated GPU, the same task
mix and the same injected environment faults; each one's max sustainable concurrency,
mean step latency, GPU utilisation and failure rate go into a table, PNG plots and
`docs/baseline.md`. The model and its assumptions: `bench/baseline/` and the report.

`--quick` runs a small scenario (2 GPUs x 16 slots, a few levels) and writes its
report under a temporary directory, so the committed report is only ever a full run.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench.baseline import markdown
from bench.baseline.report import (
    FrontierPoint,
    Outcome,
    frontier_plot,
    frontier_table,
    headline,
    judge,
    plots,
    ratios,
    sensitivity,
)
from bench.baseline.scenario import QUICK, QUICK_FRONTIER, Frontier, Mechanism, Scenario
from bench.baseline.sides import Level, megaflow_level, monolith_level
from bench.stats import print_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _print(outcome: Outcome, level: Level) -> None:
    print(
        f"  {outcome.system:>24} N={level.concurrency:>6,}: {level.steps_per_s:8,.0f} steps/s, "
        f"step {level.mean_step_s * 1000:5.0f} ms (p99 {level.p99_step_s * 1000:5.0f}), "
        f"GPU {level.utilisation:6.1%}, failed {level.failure_rate:5.1%}, "
        f"CPU {level.cpu_share:4.0%}, {level.wall_s:4.0f} s"
        + ("" if level.sustainable else f"  -- not sustainable: {level.why_not}"),
        flush=True,
    )


def _record(outcome: Outcome, level: Level, sc: Scenario) -> bool:
    """Judge `level`, add it to the ramp; whether the ramp goes on."""
    outcome.levels.append(level)
    previous = outcome.levels[-2] if len(outcome.levels) > 1 else None
    judge(level, previous, sc, outcome.memory_cap)
    _print(outcome, level)
    if level.sustainable:
        outcome.best = level
    return level.sustainable


async def _ramp_monoliths(sc: Scenario) -> dict[Mechanism, Outcome]:
    """Ramp every monolith variant; a level of each variant still going runs at the same
    time as the others' (they use a few % of a core together: see the CPU column)."""
    mono_mib = sc.worker_mib + sc.sandbox_mib
    outcomes = {
        mech: Outcome(sc.monolith_name(mech), [], mono_mib, sc.memory_cap(mono_mib))
        for mech in sc.variants()
    }
    going = set(outcomes)
    for n in sc.baseline_levels:
        active = [m for m in outcomes if m in going and n <= outcomes[m].memory_cap]
        if not active:
            break
        levels = await asyncio.gather(*(monolith_level(sc, n, m) for m in active))
        for mech, level in zip(active, levels, strict=True):
            if not _record(outcomes[mech], level, sc):
                going.discard(mech)
    return outcomes


async def _ramp_megaflow(sc: Scenario, root: Path) -> Outcome:
    # MegaFlow's per-task memory is measured: a first ramp tells it, then it is re-judged.
    megaflow = Outcome("MegaFlow", [], 0.0, 1 << 62)
    for n in sc.megaflow_levels:
        if not _record(megaflow, await megaflow_level(sc, n, root), sc):
            break
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
    return megaflow


async def compare(
    sc: Scenario, root: Path, *, equal_concurrency: bool = True
) -> tuple[dict[Mechanism, Outcome], Outcome, dict[int, Level]]:
    """Ramp the monolith (every variant) and MegaFlow; also MegaFlow at each monolith
    variant's max concurrency (one level when they agree), keyed by that concurrency."""
    monoliths = await _ramp_monoliths(sc)
    megaflow = await _ramp_megaflow(sc, root)
    equal: dict[int, Level] = {}
    if equal_concurrency:
        for out in monoliths.values():
            if out.best is None or out.best.concurrency in equal:
                continue
            n = out.best.concurrency
            same = [lv for lv in megaflow.levels if lv.concurrency == n]
            equal[n] = same[0] if same else await megaflow_level(sc, n, root)
    return monoliths, megaflow, equal


async def frontier(sc: Scenario, fr: Frontier, root: Path) -> list[FrontierPoint]:
    """The comparison again at each of `fr`'s context scales (on `1/fr.fraction` of the
    hardware, the headline's monolith only): how the two ratios move together."""
    points = []
    for scale in fr.context_scales:
        sub = fr.scenario(sc, scale)
        print(f"workload frontier: context x{scale:g}", flush=True)
        ledgers = root / f"frontier-x{scale:g}"  # a fresh ledger per level and scale
        ledgers.mkdir()
        monoliths, megaflow, _ = await compare(sub, ledgers, equal_concurrency=False)
        points.append(FrontierPoint(scale, monoliths[sub.monolith_exec], megaflow))
    return points


async def run(
    quick: bool = False,
    scenario: Scenario | None = None,
    docs_dir: Path | None = None,
    frontier_config: Frontier | None = None,
) -> dict[str, float]:
    sc = scenario or (QUICK if quick else Scenario())
    fr = frontier_config or (QUICK_FRONTIER if quick else Frontier())
    if docs_dir is None:
        docs_dir = Path(tempfile.mkdtemp(prefix="megaflow-baseline-")) if quick else DOCS
    load_before = _load()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="megaflow-baseline-") as tmp:
        monoliths, megaflow, equals = await compare(sc, Path(tmp))
        points = await frontier(sc, fr, Path(tmp))
    wall = time.monotonic() - t0
    baseline = monoliths[sc.monolith_exec]
    equal = equals.get(baseline.best.concurrency) if baseline.best else None
    columns, rows = headline(baseline, megaflow)
    print_table(
        f"MegaFlow vs monolith ({sc.monolith_path().name}): {sc.gpu_slots:,} simulated GPU "
        f"slots, faults {sc.fault_rate:.1%}/op, x{sc.time_scale:g} time",
        rows,
        columns,
    )
    columns, rows = sensitivity(sc, monoliths, megaflow, equals)
    print_table("Sensitivity: the monolith's per-command path", rows, columns)
    columns, rows = frontier_table(points)
    print_table(
        f"Workload frontier: context length (1/{fr.fraction} of the hardware)", rows, columns
    )
    outcomes = [*monoliths.values(), megaflow]
    images = plots(outcomes, docs_dir / "baseline", sc.sla_p99_step_s, equal)
    headline_ratios = ratios(baseline, megaflow)
    images.append(frontier_plot(points, headline_ratios, docs_dir / "baseline", fr.fraction))
    report = docs_dir / "baseline.md"
    markdown.write(
        report,
        sc,
        monoliths,
        megaflow,
        equals,
        points,
        fr,
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
    for mech, out in monoliths.items():
        if (r := ratios(out, megaflow)) is not None:
            figures[f"concurrency_ratio_{mech}"], figures[f"step_ratio_{mech}"] = r
    for point in points:
        if (r := point.ratios) is not None:
            scale = f"frontier_x{point.context_scale:g}"
            figures[f"{scale}_concurrency_ratio"], figures[f"{scale}_step_ratio"] = r
    return figures
