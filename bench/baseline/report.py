"""What is sustainable, the headline table, the plots and the markdown report."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.baseline.scenario import LABELS, Mechanism, Scenario
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


TARGET_CONCURRENCY = 15.0
TARGET_STEP = 0.5
TARGET_UTILISATION = 0.87


def ratios(monolith: Outcome, megaflow: Outcome) -> tuple[float, float] | None:
    """(concurrency ratio, mean step ratio), each system at its own max sustainable
    level; None when either sustains none."""
    b, m = monolith.best, megaflow.best
    if b is None or m is None:
        return None
    return m.concurrency / b.concurrency, m.mean_step_s / b.mean_step_s


def targets_met(monolith: Outcome, megaflow: Outcome) -> int:
    """How many of the three targets (concurrency, step latency, utilisation) hold."""
    r, m = ratios(monolith, megaflow), megaflow.best
    if r is None or m is None:
        return 0
    return sum(
        (r[0] >= TARGET_CONCURRENCY, r[1] <= TARGET_STEP, m.utilisation >= TARGET_UTILISATION)
    )


def sensitivity(
    sc: Scenario,
    monoliths: dict[Mechanism, Outcome],
    megaflow: Outcome,
    equals: dict[int, Level] | None = None,
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """One row per monolith variant: its per-command cost, its own max, and MegaFlow's
    ratios against it (each at its own max sustainable concurrency; the mean step ratio
    also with MegaFlow at the monolith's N, from `equals`)."""
    columns = (
        "monolith per-command path",
        "cost/op (CPU share)",
        "monolith max N",
        "monolith mean step",
        "concurrency ratio",
        "mean step ratio",
        "mean step ratio at the monolith's N",
        "GPU util (monolith)",
        "targets met",
    )
    equals = equals or {}
    rows: list[tuple[str, ...]] = []
    for mech, out in monoliths.items():
        path = sc.monolith_path(mech)
        cost = f"{path.op_s * 1000:.1f} ms ({path.op_cpu:.0%})" if path.op_s else "0"
        name = LABELS[mech] + (" (headline)" if mech == sc.monolith_exec else "")
        b, r = out.best, ratios(out, megaflow)
        if b is None or r is None:
            rows.append((name, cost, "none", "-", "-", "-", "-", "-", "-"))
            continue
        conc, step = r
        rows.append(
            (
                name,
                cost,
                f"{b.concurrency:,}",
                f"{b.mean_step_s * 1000:.0f} ms",
                f"{conc:.1f}x",
                f"{step:.2f}x",
                ratio(equals[b.concurrency].mean_step_s, b.mean_step_s)
                if b.concurrency in equals
                else "-",
                f"{b.utilisation:.1%}",
                f"{targets_met(out, megaflow)} of 3",
            )
        )
    return columns, rows


@dataclass
class FrontierPoint:
    """The comparison at one context scale (the workload frontier)."""

    context_scale: float
    monolith: Outcome
    megaflow: Outcome

    @property
    def ratios(self) -> tuple[float, float] | None:
        return ratios(self.monolith, self.megaflow)

    def met(self) -> int:
        return targets_met(self.monolith, self.megaflow)


def _max_n(out: Outcome) -> str:
    """A side's max sustainable N, or why its first level was not sustainable."""
    if out.best is not None:
        return f"{out.best.concurrency:,}"
    return f"none ({out.levels[0].why_not})" if out.levels else "none (no level)"


def frontier_table(points: list[FrontierPoint]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    columns = (
        "context scale",
        "prompt tokens/call",
        "monolith max N",
        "MegaFlow max N",
        "concurrency ratio",
        "monolith step",
        "MegaFlow step",
        "mean step ratio",
        "GPU util (monolith / MegaFlow)",
        "throughput ratio",
        "core-s per step / slot-s per call",
        "targets met",
    )
    rows: list[tuple[str, ...]] = []
    for p in points:
        b, m = p.monolith.best, p.megaflow.best
        seen = [*p.monolith.levels, *p.megaflow.levels]
        tokens = seen[0].mean_prompt_tokens if seen else float("nan")
        head = (f"{p.context_scale:g}x", f"{tokens:,.0f}", _max_n(p.monolith), _max_n(p.megaflow))
        if b is None or m is None or p.ratios is None:
            rows.append((*head, *("-",) * 8))
            continue
        conc, step = p.ratios
        rows.append(
            (
                *head,
                f"{conc:.1f}x",
                f"{b.mean_step_s * 1000:.0f} ms",
                f"{m.mean_step_s * 1000:.0f} ms",
                f"{step:.2f}x",
                f"{b.utilisation:.1%} / {m.utilisation:.1%}",
                ratio(m.steps_per_s, b.steps_per_s),
                ratio(b.core_s_per_call, m.slot_s_per_call),
                f"{p.met()} of 3",
            )
        )
    return columns, rows


def frontier_plot(
    points: list[FrontierPoint],
    headline_ratios: tuple[float, float] | None,
    out_dir: Path,
    fraction: int,
) -> Path:
    """Concurrency ratio against mean step ratio, one point per context scale, with the
    region where both targets hold shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    placed = [(p.context_scale, p.ratios) for p in points if p.ratios is not None]
    xs = [r[0] for _, r in placed]
    ys = [r[1] for _, r in placed]
    top = max([TARGET_CONCURRENCY * 1.6, *xs, headline_ratios[0] if headline_ratios else 0])
    ax.fill_between(
        [TARGET_CONCURRENCY, top * 1.2], 0, TARGET_STEP, color="tab:green", alpha=0.15,
        label="both targets met",
    )  # fmt: skip
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"1/{fraction} of the hardware, by context scale")
    for scale, (x, y) in placed:
        ax.annotate(f"{scale:g}x", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if headline_ratios is not None:
        ax.plot(*headline_ratios, "*", color="tab:red", markersize=14, label="headline run")
    ax.set_xlim(0, top * 1.2)
    ax.set_ylim(0, max([1.3, *ys, headline_ratios[1] if headline_ratios else 0]) * 1.1)
    ax.set_xlabel("max sustainable concurrency: MegaFlow / monolith")
    ax.set_ylabel("mean step latency: MegaFlow / monolith")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "frontier.png"
    fig.savefig(path)
    plt.close(fig)
    return path


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
    "path/op",
    "loop/step",
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
        f"{lv.path_s_per_op * 1000:.2f} ms",
        f"{lv.overhead_per_step_s * 1e6:.0f} µs",
        f"{lv.failed} ({lv.failure_rate:.1%})",
        f"{lv.retries}",
        f"{lv.cpu_share:.0%}",
        f"{lv.wall_s:.0f} s",
        "yes" if lv.sustainable else f"no: {lv.why_not}",
    )


def markdown_table(
    columns: tuple[str, ...], rows: list[tuple[str, ...]], *, numeric: bool = True
) -> str:
    """A markdown table; `numeric`: right-align every column but the first."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if i and numeric else "---" for i in range(len(columns))) + "|"
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
    specs: tuple[tuple[str, str, Callable[[Level], float], bool], ...] = (
        ("throughput.png", "steps/s (modelled)", lambda lv: lv.steps_per_s, False),
        (
            "step_latency.png",
            "step latency (ms): mean, p99",
            lambda lv: lv.mean_step_s * 1000,
            True,
        ),
        ("gpu_utilisation.png", "GPU utilisation (%)", lambda lv: lv.utilisation * 100, False),
    )
    colours = {"MegaFlow": "tab:blue"}
    spare = iter(("tab:red", "tab:orange", "tab:brown", "tab:pink", "tab:grey"))
    paths = []
    for name, label, value, with_p99 in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
        for out in outcomes:
            colour = colours.get(out.system) or colours.setdefault(out.system, next(spare))
            points = list(out.levels)
            if extra is not None and extra.system == out.system and extra not in points:
                points.append(extra)
            points.sort(key=lambda lv: lv.concurrency)
            xs = [lv.concurrency for lv in points]
            variant = out.system.startswith("monolith (")  # a sensitivity variant: lighter
            style = "s:" if variant else "o-"
            ax.plot(xs, [value(lv) for lv in points], style, color=colour, label=out.system)
            if with_p99 and not variant:
                p99 = [lv.p99_step_s * 1000 for lv in points]
                ax.plot(xs, p99, "x--", color=colour, alpha=0.6, label=f"{out.system} p99")
            if out.best is not None:
                ax.plot(
                    [out.best.concurrency],
                    [value(out.best)],
                    "*",
                    color=colour,
                    markersize=11 if variant else 16,
                    label=None if variant else f"{out.system} max sustainable",
                )
        if with_p99 and sla_s is not None:
            ax.axhline(sla_s * 1000, color="grey", linestyle=":", label="p99 SLA")
        ax.set_xscale("log")
        ax.set_xlabel("offered concurrency (workers / in-flight tasks)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
