"""What is sustainable, the headline table, the plots and the markdown report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bench.baseline.scenario import Scenario
from bench.baseline.sides import Level


@dataclass
class Outcome:
    """One system's ramp and the level it sustains at most."""

    system: str
    levels: list[Level]
    per_task_mib: float  # memory one in-flight task needs on the node that limits it
    memory_cap: int
    best: Level | None = None


def judge(level: Level, previous: Level | None, sc: Scenario, memory_cap: int) -> None:
    """Mark `level` sustainable or say why not; `previous` is the ramp's level before it.

    Sustainable at N: N fits the node's memory, the p99 step latency is within the
    SLA, and throughput still grows: steps/s at least `1 + min_growth` times that of
    the previous (smaller) level of the ramp.
    """
    reasons = []
    if level.concurrency > memory_cap:
        reasons.append(f"exceeds the memory cap {memory_cap:,}")
    if not level.p99_step_s <= sc.sla_p99_step_s:
        reasons.append(f"p99 step {level.p99_step_s * 1000:.0f} ms > SLA")
    if previous is not None and level.steps_per_s < (1 + sc.min_growth) * previous.steps_per_s:
        growth = level.steps_per_s / previous.steps_per_s - 1 if previous.steps_per_s else 0.0
        reasons.append(f"throughput grew {growth:+.0%} (< {sc.min_growth:+.0%})")
    level.sustainable = not reasons
    level.why_not = "; ".join(reasons)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def headline(baseline: Outcome, megaflow: Outcome) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    columns = (
        "system",
        "max sustainable concurrency",
        "mean step latency",
        "p99 step",
        "GPU utilisation",
        "failure rate",
        "steps/s",
    )
    rows: list[tuple[str, ...]] = []
    for out in (baseline, megaflow):
        b = out.best
        if b is None:
            rows.append((out.system, "none", "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                out.system,
                f"{b.concurrency:,}",
                f"{b.mean_step_s * 1000:.0f} ms",
                f"{b.p99_step_s * 1000:.0f} ms",
                f"{b.utilisation:.1%}",
                f"{b.failure_rate:.2%}",
                f"{b.steps_per_s:,.0f}",
            )
        )
    if baseline.best and megaflow.best:
        b, m = baseline.best, megaflow.best
        rows.append(
            (
                "MegaFlow / monolith",
                ratio(m.concurrency, b.concurrency),
                ratio(m.mean_step_s, b.mean_step_s),
                ratio(m.p99_step_s, b.p99_step_s),
                ratio(m.utilisation, b.utilisation),
                ratio(m.failure_rate, b.failure_rate),
                ratio(m.steps_per_s, b.steps_per_s),
            )
        )
    return columns, rows


LEVEL_COLUMNS = (
    "N",
    "tasks",
    "steps/s",
    "mean step",
    "(model + env)",
    "p99 step",
    "GPU util",
    "prefix hits",
    "env busy",
    "core wait/op",
    "failed",
    "retries",
    "CPU",
    "wall",
    "sustainable",
)


def level_row(lv: Level) -> tuple[str, ...]:
    return (
        f"{lv.concurrency:,}",
        f"{lv.tasks:,}",
        f"{lv.steps_per_s:,.0f}",
        f"{lv.mean_step_s * 1000:.0f} ms",
        f"{lv.mean_model_s * 1000:.0f} + {lv.mean_env_s * 1000:.0f} ms",
        f"{lv.p99_step_s * 1000:.0f} ms",
        f"{lv.utilisation:.1%}",
        f"{lv.prefix_hit_rate:.0%}",
        f"{lv.env_busy:,.0f}",
        f"{lv.core_wait_s * 1000:.0f} ms",
        f"{lv.failed} ({lv.failure_rate:.1%})",
        f"{lv.retries}",
        f"{lv.cpu_share:.0%}",
        f"{lv.wall_s:.0f} s",
        "yes" if lv.sustainable else f"no: {lv.why_not}",
    )


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(r) + " |" for r in rows)])


def plots(
    outcomes: list[Outcome],
    out_dir: Path,
    sla_s: float | None = None,
    extra: Level | None = None,
) -> list[Path]:
    """Throughput, step latency and GPU utilisation against offered concurrency;
    `extra` (a level outside a ramp) joins the curve of its system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    specs = (
        ("throughput.png", "steps/s (modelled)", lambda lv: lv.steps_per_s, False),
        (
            "step_latency.png",
            "step latency (ms): mean, p99",
            lambda lv: lv.mean_step_s * 1000,
            True,
        ),
        ("gpu_utilisation.png", "GPU utilisation (%)", lambda lv: lv.utilisation * 100, False),
    )
    paths = []
    for name, label, value, with_p99 in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
        for out, colour in zip(outcomes, ("tab:red", "tab:blue"), strict=True):
            points = list(out.levels)
            if extra is not None and extra.system == out.system and extra not in points:
                points.append(extra)
            points.sort(key=lambda lv: lv.concurrency)
            xs = [lv.concurrency for lv in points]
            ax.plot(xs, [value(lv) for lv in points], "o-", color=colour, label=out.system)
            if with_p99:
                p99 = [lv.p99_step_s * 1000 for lv in points]
                ax.plot(xs, p99, "x--", color=colour, alpha=0.6, label=f"{out.system} p99")
            if out.best is not None:
                ax.plot(
                    [out.best.concurrency],
                    [value(out.best)],
                    "*",
                    color=colour,
                    markersize=16,
                    label=f"{out.system} max sustainable",
                )
        if with_p99 and sla_s is not None:
            ax.axhline(sla_s * 1000, color="grey", linestyle=":", label="p99 SLA")
        ax.set_xscale("log")
        ax.set_xlabel("offered concurrency (workers / in-flight tasks)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
