"""What the CLI shows about task sets: bad rows, and `megaflow validate`'s table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from megaflow.tasks.rows import RowError
from megaflow.tasks.validate import TaskCheck


def print_row_errors(console: Console, errors: list[RowError]) -> None:
    """One line per bad row: where, which field, why (the good rows still load)."""
    console.print(f"[yellow]{len(errors)} bad row(s) skipped[/]:")
    for error in errors:
        console.print(f"  {error}", markup=False, highlight=False, soft_wrap=True)


def _reward(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def print_validation(console: Console, checks: list[TaskCheck]) -> int:
    """The validation table; returns how many tasks are broken."""
    table = Table(title="validation (gold solution must score 1, unpatched 0)")
    for column in ("task", "gold", "unpatched", "result", "why"):
        table.add_column(column)
    for check in checks:
        table.add_row(
            check.task_id,
            _reward(check.gold_reward),
            _reward(check.unpatched_reward),
            "[green]ok[/]" if check.ok else "[red]BROKEN[/]",
            "; ".join(check.problems),
        )
    console.print(table)
    broken = sum(1 for c in checks if not c.ok)
    console.print(f"{len(checks) - broken} of {len(checks)} task(s) valid, {broken} broken")
    return broken
