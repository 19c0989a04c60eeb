"""Resume: run again only the tasks of an earlier run that have no scored result.

A task is kept when it has a reward: it succeeded, or failed with error kind "task"
(reward 0, final). Tasks that failed for the infrastructure, were cancelled, or never
finished (the run was interrupted) run again. The earlier run's folder tells which is
which: its results.jsonl (every task it finished, flushed as each did, earlier
resumptions included) and its ledger.sqlite (durable before results.jsonl is written,
so a task finished just before a crash is found there too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import ParseDict, ParseError

from megaflow._results import Result
from megaflow.core.errors import InvalidRequestError
from megaflow.deploy.run import (
    EventHook,
    RunSummary,
    result_from_record,
    result_record,
    trajectory_record,
)
from megaflow.v1 import common_pb2, scheduler_pb2


@dataclass
class Earlier:
    """The scored tasks of an earlier run, by task id, in the order it finished them."""

    results: dict[str, Result] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # results.jsonl lines
    trajectories: dict[str, dict[str, Any]] = field(default_factory=dict)  # and theirs

    def keep(
        self,
        result: common_pb2.TaskResult,
        trajectory: common_pb2.Trajectory | None,
        record: dict[str, Any],
        trajectory_line: dict[str, Any],
    ) -> None:
        if result.has_reward and result.task_id not in self.results:
            self.results[result.task_id] = Result.from_proto(result, trajectory)
            self.records[result.task_id] = record
            self.trajectories[result.task_id] = trajectory_line


async def read_earlier(folder: Path) -> Earlier:
    """The scored tasks of the run whose outputs are in `folder`. InvalidRequestError
    when the folder holds no run, or a run that is still going."""
    results_path, ledger_path = folder / "results.jsonl", folder / "ledger.sqlite"
    if not results_path.exists() and not ledger_path.exists():
        raise InvalidRequestError(f"{folder} holds no earlier run (no results.jsonl, no ledger)")
    earlier = Earlier()
    trajectories = _trajectory_lines(folder / "trajectories.jsonl")
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            try:
                record = json.loads(line)
                result = result_from_record(record)
                line_of = trajectories.get(result.task_id, {"task_id": result.task_id})
                trajectory = common_pb2.Trajectory()
                if line_of.get("turns") or line_of.get("messages"):
                    ParseDict(line_of, trajectory)
            except (ValueError, KeyError, TypeError, ParseError):
                continue  # a line cut short by a crash: the ledger may have the task
            earlier.keep(result, trajectory if trajectory.turns else None, record, line_of)
    if ledger_path.exists():
        await _read_ledger(ledger_path, earlier)
    return earlier


async def _read_ledger(path: Path, earlier: Earlier) -> None:
    from megaflow.deploy.run import live_ledger_holder
    from megaflow.store.sqlite import SqliteLedger

    holder = await live_ledger_holder(path)
    if holder is not None:
        raise InvalidRequestError(
            f"the run in {path.parent} is still going (scheduler {holder}); wait for it"
        )
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        for run in await ledger.runs():
            for row in await ledger.run(run.run_id):
                if row.result is None:
                    continue
                line = trajectory_record(row.trajectory) if row.trajectory else {}
                line.setdefault("task_id", row.task_id)
                earlier.keep(row.result, row.trajectory, result_record(row.result), line)
    finally:
        await ledger.close()


def _trajectory_lines(path: Path) -> dict[str, dict[str, Any]]:
    lines: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
                lines[str(item["task_id"])] = item
            except (ValueError, KeyError, TypeError):
                continue
    return lines


def write_kept(earlier: Earlier, out: Path) -> None:
    """Start `out`'s results.jsonl and trajectories.jsonl with the kept tasks (the new
    run appends to them). Written aside and renamed: a crash loses neither version."""
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in (("results", earlier.records), ("trajectories", earlier.trajectories)):
        final = out / f"{name}.jsonl"
        aside = out / f".{name}.jsonl.resume"
        aside.write_text("".join(json.dumps(item) + "\n" for item in lines.values()))
        os.replace(aside, final)


async def prepare_resume(
    folder: Path, specs: list[common_pb2.TaskSpec], out: Path | None
) -> tuple[list[common_pb2.TaskSpec], list[Result]]:
    """The specs that still need a run, and the earlier run's scored results (written
    to `out` first when given)."""
    earlier = await read_earlier(folder)
    if out is not None:
        write_kept(earlier, out)
    todo = [spec for spec in specs if spec.task_id not in earlier.results]
    return todo, list(earlier.results.values())


async def resume_on_scheduler(
    address: str,
    run_id: str,
    specs: list[common_pb2.TaskSpec],
    out: Path,
    *,
    concurrency: int = 0,
    on_submitted: Callable[[str], None] | None = None,
    on_event: EventHook | None = None,
) -> RunSummary:
    """`megaflow run --scheduler ADDR --resume RUN_ID`: rerun the tasks of `specs` that
    have no scored result in run `run_id` (see `Client.resume`), and write the whole
    set's outputs to `out`: the kept results first, then the new ones."""
    from megaflow._client import connect

    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the run
    summary = RunSummary()
    with (
        (out / "results.jsonl").open("w") as results,
        (out / "trajectories.jsonl").open("w") as trajectories,
    ):
        async with connect(address) as client:
            run = await client.resume(run_id, specs, concurrency=concurrency)
            summary.run_id = run.run_id
            summary.total = len(run.kept) + len(run.task_ids)
            if on_submitted is not None:
                on_submitted(run.run_id)
            async for result in run:
                record = result_record(result.to_proto())
                line = trajectory_record(result.trajectory.to_proto()) if result.trajectory else {}
                line.setdefault("task_id", result.task_id)
                results.write(json.dumps(record) + "\n")
                results.flush()
                trajectories.write(json.dumps(line) + "\n")
                trajectories.flush()
                summary.records.append(record)
                if on_event is not None:
                    event = scheduler_pb2.TaskEvent(
                        type=scheduler_pb2.EVENT_TYPE_TASK_FINISHED, task_id=result.task_id
                    )
                    on_event(event, summary)
    return summary
