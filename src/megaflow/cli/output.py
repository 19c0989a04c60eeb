"""What the CLI shows: a live progress bar and the end-of-run tables."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.markup import escape
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

    def __init__(self, console: Console, total: int | None) -> None:
        """`total` None: not known (a re-attached watch)."""
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


OUTCOME_LABELS = {
    "succeeded": "succeeded (scored)",
    "task": "failed: task (scored)",
    "infra": "failed: infrastructure (no result)",
    "invalid": "failed: invalid (no result)",
    "cancelled": "cancelled (no result)",
}


def print_summary(console: Console, summary: RunSummary, out: Path | None) -> None:
    """The run's table (every outcome class with its count), then its commonest errors."""
    table = Table(title=f"MegaFlow run {summary.run_id}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    mean = summary.mean_reward
    rows = [("tasks", str(summary.total)), ("finished", str(summary.finished))]
    for name, count in summary.outcomes().items():
        label = OUTCOME_LABELS.get(name, f"{name} (no result)")
        style = "red" if count and name not in ("succeeded", "task") else ""
        rows.append((label, f"[{style}]{count}[/]" if style else str(count)))
    rows += [
        ("infrastructure retries", str(summary.retries)),
        ("mean reward", "n/a" if mean is None else f"{mean:.3f}"),
        ("wall time", f"{summary.wall_s:.1f} s"),
    ]
    if summary.model_utilisation is not None:
        rows.append(("simulated GPU utilisation", f"{summary.model_utilisation:.1%}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    errors = summary.top_errors(5)
    if errors:
        top = Table(title="commonest errors")
        top.add_column("tasks", justify="right")
        top.add_column("error", overflow="fold")
        for message, count in errors:
            top.add_row(str(count), escape(message))
        console.print(top)
    if out is not None:
        console.print(
            f"results: {out / 'results.jsonl'}\ntrajectories: {out / 'trajectories.jsonl'}"
        )
    missing = summary.total - summary.finished
    if summary.unscored or missing:
        console.print(
            f"[red]{summary.unscored + missing} of {summary.total} tasks ended without a "
            "result[/]: infrastructure, invalid or cancelled (see the errors above)"
        )


def print_status(console: Console, status: scheduler_pb2.StatusResponse) -> None:
    table = Table(title="tasks")
    names = ("pending", "queued", "running", "succeeded", "failed")
    for name in (*names, "oldest wait", "wait p50", "wait p99"):
        table.add_column(name, justify="right")
    table.add_row(
        *(str(getattr(status, n)) for n in names),
        f"{status.oldest_wait_s:.1f} s",
        f"{status.wait_p50_s:.2f} s",
        f"{status.wait_p99_s:.2f} s",
    )
    console.print(table)
    for title, depths in (("queue per run", status.runs), ("queue per user", status.users)):
        if not depths:
            continue
        queue = Table(title=title)
        for name in ("run" if depths is status.runs else "user", "queued", "in flight"):
            queue.add_column(name, justify="left" if name in ("run", "user") else "right")
        for depth in depths:
            queue.add_row(depth.key or "-", str(depth.queued), str(depth.in_flight))
        console.print(queue)
    if status.pools:
        pools = Table(title="pools and model limits")
        for name in ("pool", "in flight", "limit"):
            pools.add_column(name, justify="left" if name == "pool" else "right")
        for pool in status.pools:
            pools.add_row(pool.name, str(pool.in_flight), str(pool.limit or "-"))
        console.print(pools)
    if status.counters:
        failures = Table(title="failure handling")
        for name in ("counter", "count"):
            failures.add_column(name, justify="left" if name == "counter" else "right")
        for name, count in sorted(status.counters.items()):
            failures.add_row(name.replace("_", " "), str(count))
        console.print(failures)
    services = Table(title="services")
    columns = ("kind", "address", "in flight", "capacity", "cpu", "memory", "gpus")
    for name in (*columns, "dispatched", "warm", "last seen"):
        services.add_column(name)
    for svc in status.services:
        res = svc.resources
        services.add_row(
            KIND_NAMES.get(svc.kind, "?"),
            svc.address,
            str(svc.in_flight),
            str(svc.capacity),
            f"{svc.cpu_millis_used / 1000:g}/{res.cpu_millis / 1000:g}" if res.cpu_millis else "-",
            f"{svc.memory_mib_used}/{res.memory_mib} MiB" if res.memory_mib else "-",
            f"{svc.gpus_used}/{res.gpus} {res.accelerator}".strip() if res.gpus else "-",
            str(svc.dispatched),
            str(svc.warm_placements) if res.warm_images else "-",
            f"{svc.last_seen_s_ago:.1f} s ago",
        )
    console.print(services)


def count_lines(path: Path) -> int:
    try:
        with path.open() as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
