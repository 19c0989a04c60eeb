"""What the CLI shows: a live progress bar and the end-of-run tables."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from megaflow.deploy.run import RunSummary
from megaflow.v1 import scheduler_pb2

KIND_NAMES = {
    scheduler_pb2.SERVICE_KIND_MODEL: "model",
    scheduler_pb2.SERVICE_KIND_AGENT: "agent",
    scheduler_pb2.SERVICE_KIND_ENV: "env",
}


class RunProgress:
    """A progress bar fed by task events."""

    def __init__(self, console: Console, total: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("run", total=total, detail="")

    def update(self, event: scheduler_pb2.TaskEvent, summary: RunSummary) -> None:
        detail = (
            f"ok {summary.count('succeeded')} · failed {summary.count('failed')}"
            f" · retries {summary.retries}"
        )
        self._progress.update(self._task, completed=summary.finished, detail=detail)

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()


def print_summary(console: Console, summary: RunSummary, out: Path) -> None:
    table = Table(title=f"MegaFlow run {summary.run_id}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    mean = summary.mean_reward
    rows = [
        ("tasks", str(summary.total)),
        ("finished", str(summary.finished)),
        ("succeeded (scored)", str(summary.count("succeeded"))),
        ("failed: task", str(summary.count("failed", "task"))),
        ("failed: infrastructure (no reward)", str(summary.count("failed", "infra"))),
        ("infrastructure retries", str(summary.retries)),
        ("mean reward", "n/a" if mean is None else f"{mean:.3f}"),
        ("wall time", f"{summary.wall_s:.1f} s"),
    ]
    if summary.model_utilisation is not None:
        rows.append(("simulated GPU utilisation", f"{summary.model_utilisation:.1%}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"results: {out / 'results.jsonl'}\ntrajectories: {out / 'trajectories.jsonl'}")


def print_status(console: Console, status: scheduler_pb2.StatusResponse) -> None:
    table = Table(title="tasks")
    for name in ("pending", "running", "succeeded", "failed"):
        table.add_column(name, justify="right")
    table.add_row(*(str(getattr(status, n)) for n in ("pending", "running", "succeeded", "failed")))
    console.print(table)
    services = Table(title="services")
    for name in ("kind", "address", "in flight", "capacity", "dispatched", "last seen"):
        services.add_column(name)
    for svc in status.services:
        services.add_row(
            KIND_NAMES.get(svc.kind, "?"),
            svc.address,
            str(svc.in_flight),
            str(svc.capacity),
            str(svc.dispatched),
            f"{svc.last_seen_s_ago:.1f} s ago",
        )
    console.print(services)


def count_lines(path: Path) -> int:
    try:
        with path.open() as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
