"""Submit a batch of tasks to a scheduler, follow its events, keep or write the outputs.

Works against any `SchedulerService`: the embedded one or a gRPC client. The results
come back in memory (`RunSummary.finished_tasks`) and, when an output folder is given,
each result and trajectory is appended to `results.jsonl` / `trajectories.jsonl`
(flushed) the moment its task finishes, so an interrupted run keeps everything it
finished. The gRPC client's watch reconnects when the scheduler restarts (and the
scheduler replays the finished tasks from its ledger): each task is written once,
however often it is seen. `watch_batch` does the same for a run submitted earlier
(re-attaching after the client that submitted it died).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from google.protobuf.json_format import MessageToDict

from megaflow.contract import SchedulerService
from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import common_pb2, scheduler_pb2

STATE_NAMES = {
    common_pb2.TASK_STATE_SUCCEEDED: "succeeded",
    common_pb2.TASK_STATE_FAILED: "failed",
    common_pb2.TASK_STATE_PENDING: "pending",
    common_pb2.TASK_STATE_RUNNING: "running",
}
ERROR_KIND_NAMES = {
    common_pb2.ERROR_KIND_NONE: "none",
    common_pb2.ERROR_KIND_TASK: "task",
    common_pb2.ERROR_KIND_INFRA: "infra",
    common_pb2.ERROR_KIND_INVALID: "invalid",
    common_pb2.ERROR_KIND_CANCELLED: "cancelled",
}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}
ERROR_KIND_VALUES = {name: value for value, name in ERROR_KIND_NAMES.items()}


def result_record(result: common_pb2.TaskResult) -> dict[str, Any]:
    """One line of results.jsonl. `reward` is null when there is no result."""
    return {
        "task_id": result.task_id,
        "status": STATE_NAMES.get(result.state, "unknown"),
        "reward": result.reward if result.has_reward else None,
        "attempts": result.attempts,
        "steps": result.steps,
        "error_kind": ERROR_KIND_NAMES.get(result.error_kind, "unknown"),
        "error": result.error,
        "error_type": result.error_type,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "duration_s": round(result.duration_s, 4),
        "setup_s": round(result.setup_s, 4),
        "teardown_s": round(result.teardown_s, 4),
        "attempt_id": result.attempt_id,
        "tests": [
            {"test_id": t.test_id, "status": t.status, "group": t.group} for t in result.tests
        ],
    }


def result_from_record(record: dict[str, Any]) -> common_pb2.TaskResult:
    """The `TaskResult` a results.jsonl line was made from (`result_record`'s inverse,
    less `eval_output`, which the line does not keep). KeyError/ValueError when the
    line is not such a record."""
    reward = record["reward"]
    return common_pb2.TaskResult(
        task_id=str(record["task_id"]),
        state=STATE_VALUES[record["status"]],
        has_reward=reward is not None,
        reward=float(reward or 0.0),
        attempts=int(record["attempts"]),
        steps=int(record["steps"]),
        error_kind=ERROR_KIND_VALUES[record["error_kind"]],
        error=str(record.get("error", "")),
        prompt_tokens=int(record.get("prompt_tokens", 0)),
        completion_tokens=int(record.get("completion_tokens", 0)),
        duration_s=float(record.get("duration_s", 0.0)),
        setup_s=float(record.get("setup_s", 0.0)),
        teardown_s=float(record.get("teardown_s", 0.0)),
        attempt_id=str(record.get("attempt_id", "")),
        tests=[common_pb2.TestOutcome(**t) for t in record.get("tests", [])],
    )


def trajectory_record(trajectory: common_pb2.Trajectory) -> dict[str, Any]:
    return MessageToDict(trajectory, preserving_proto_field_name=True)


OUTCOMES = ("succeeded", "task", "infra", "invalid", "cancelled")
"""The outcome classes of a finished task, in the order a summary lists them."""
_ERROR_CHARS = 200


def outcome(record: dict[str, Any]) -> str:
    """The outcome class of one results.jsonl record (see `OUTCOMES`)."""
    if record["status"] == "succeeded":
        return "succeeded"
    if record["status"] == "failed" and record["error_kind"] in OUTCOMES:
        return str(record["error_kind"])
    return f"{record['status']}/{record['error_kind']}"


def _error_line(record: dict[str, Any]) -> str:
    """The error of a record as one short line (for grouping and counting)."""
    text = " ".join(str(record.get("error") or "").split())
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class FinishedTask:
    """One task's terminal outcome, as the scheduler reported it."""

    result: common_pb2.TaskResult
    trajectory: common_pb2.Trajectory | None


@dataclass
class RunSummary:
    run_id: str = ""
    total: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0
    wall_s: float = 0.0
    model_utilisation: float | None = None  # embedded simulated model only
    # The finished tasks themselves, in finishing order (when run with collect=True).
    finished_tasks: list[FinishedTask] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return len(self.records)

    def count(self, status: str, error_kind: str | None = None) -> int:
        return sum(
            1
            for r in self.records
            if r["status"] == status and (error_kind is None or r["error_kind"] == error_kind)
        )

    def outcomes(self) -> dict[str, int]:
        """Finished tasks per outcome class, every class listed (zeros too): succeeded
        (scored), task (failed, scored), infra / invalid / cancelled (no result), and
        any other state the scheduler reported."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for record in self.records:
            name = outcome(record)
            counts[name] = counts.get(name, 0) + 1
        return counts

    @property
    def unscored(self) -> int:
        """Finished tasks without a result (no reward): infra, invalid, cancelled..."""
        return sum(1 for r in self.records if r["reward"] is None)

    def top_errors(self, n: int = 5) -> list[tuple[str, int]]:
        """The `n` commonest error messages of the tasks that failed, with counts."""
        counts = Counter(_error_line(r) for r in self.records if r["status"] != "succeeded")
        counts.pop("", None)
        return counts.most_common(n)

    @property
    def mean_reward(self) -> float | None:
        rewards = [r["reward"] for r in self.records if r["reward"] is not None]
        return sum(rewards) / len(rewards) if rewards else None


EventHook = Callable[[scheduler_pb2.TaskEvent, RunSummary], None]


async def run_batch(
    scheduler: SchedulerService,
    tasks: list[common_pb2.TaskSpec],
    out_dir: Path | None = None,
    *,
    max_concurrency: int = 0,
    on_event: EventHook | None = None,
    on_submitted: Callable[[str], None] | None = None,
    collect: bool = True,
    append: bool = False,
) -> RunSummary:
    """Run `tasks` to terminal states. With `out_dir`, write
    `out_dir/{results,trajectories}.jsonl` (`append`: after what is there, as a resumed
    run does); with `collect`, keep every result and trajectory in the summary.
    `on_submitted(run_id)` is called once the scheduler has accepted the run."""
    started = time.monotonic()
    reply = await scheduler.submit_tasks(
        scheduler_pb2.SubmitTasksRequest(tasks=tasks, max_concurrency=max_concurrency)
    )
    if on_submitted is not None:
        on_submitted(reply.run_id)
    summary = RunSummary(run_id=reply.run_id, total=len(reply.task_ids))
    await _follow(scheduler, summary, out_dir, on_event, collect, append)
    summary.wall_s = time.monotonic() - started
    return summary


async def watch_batch(
    scheduler: SchedulerService,
    run_id: str,
    out_dir: Path | None = None,
    *,
    on_event: EventHook | None = None,
    collect: bool = True,
) -> RunSummary:
    """Follow a run submitted earlier (by this client or one that died) to its end: its
    finished tasks are replayed first, then the rest as they finish. With `out_dir`,
    the outputs are rewritten there from the whole run."""
    started = time.monotonic()
    summary = RunSummary(run_id=run_id)
    await _follow(scheduler, summary, out_dir, on_event, collect, append=False)
    summary.total = summary.total or summary.finished
    summary.wall_s = time.monotonic() - started
    return summary


async def _follow(
    scheduler: SchedulerService,
    summary: RunSummary,
    out_dir: Path | None,
    on_event: EventHook | None,
    collect: bool,
    append: bool,
) -> None:
    written: set[str] = set()
    with contextlib.ExitStack() as files:
        results: IO[str] | None = None
        trajectories: IO[str] | None = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the run
            mode = "a" if append else "w"
            results = files.enter_context((out_dir / "results.jsonl").open(mode))
            trajectories = files.enter_context((out_dir / "trajectories.jsonl").open(mode))
        async for event in scheduler.watch_events(
            scheduler_pb2.WatchEventsRequest(run_id=summary.run_id)
        ):
            if event.type == scheduler_pb2.EVENT_TYPE_TASK_RETRYING:
                summary.retries += 1
            elif event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                if event.task_id in written:
                    continue  # replayed after a reconnection: written already
                written.add(event.task_id)
                record = result_record(event.result)
                summary.records.append(record)
                has_trajectory = event.HasField("trajectory")
                if collect:
                    summary.finished_tasks.append(
                        FinishedTask(event.result, event.trajectory if has_trajectory else None)
                    )
                if results is not None and trajectories is not None:
                    results.write(json.dumps(record) + "\n")
                    results.flush()
                    traj = trajectory_record(event.trajectory) if has_trajectory else {}
                    traj.setdefault("task_id", event.task_id)
                    trajectories.write(json.dumps(traj) + "\n")
                    trajectories.flush()
            if on_event is not None:
                on_event(event, summary)
            if event.type == scheduler_pb2.EVENT_TYPE_RUN_FINISHED:
                break


async def live_ledger_holder(path: Path) -> str | None:
    """The scheduler still holding the embedded run's ledger at `path` (its lease is live
    and its process alive), or None."""
    from megaflow.scheduler.recovery import LEASE, holder_alive
    from megaflow.store.sqlite import SqliteLedger

    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        holder = await ledger.lease_holder(LEASE)
    finally:
        await ledger.close()
    return holder if holder is not None and holder_alive(holder) else None


async def fresh_ledger(out: Path, on_replace: Callable[[], None] | None = None) -> Path:
    """The embedded run's ledger in `out`, without a previous run's: `out` holds the
    latest run's outputs (its results.jsonl and trajectories.jsonl are rewritten too).
    A run still going in `out` (its scheduler lease is live) is an error, not replaced;
    `on_replace` is called before a previous run's ledger is removed."""
    path = out / "ledger.sqlite"
    if path.exists():
        holder = await live_ledger_holder(path)
        if holder is not None:
            raise InvalidRequestError(
                f"a run is still going in {out} (scheduler {holder}); wait for it, or use "
                "another --out"
            )
        if on_replace is not None:
            on_replace()
        for stale in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the run
    return path
