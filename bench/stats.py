"""Percentiles and the printed table shared by the benchmarks."""

from __future__ import annotations

import statistics
import sys

from rich.console import Console
from rich.table import Table


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, nearest-rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def summarise(name: str, samples: list[float]) -> dict[str, float]:
    return {
        "p50": pct(samples, 50),
        "p99": pct(samples, 99),
        "mean": statistics.fmean(samples),
        "n": float(len(samples)),
    }


def print_table(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*row)
    # Wide when piped (logs, CI): rich would squeeze the columns to 80 characters.
    Console(width=None if sys.stdout.isatty() else 220).print(table)
