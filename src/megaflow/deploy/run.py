"""Submit a batch of tasks to a scheduler, follow its events, write the outputs.

Works against any `SchedulerService`: the embedded one or a gRPC client. Each result
and trajectory is appended to `results.jsonl` / `trajectories.jsonl` (flushed) the
moment its task finishes, so an interrupted run keeps everything it finished. The gRPC
client's watch reconnects when the scheduler restarts (and the scheduler replays the
finished tasks from its ledger): each task is written once, however often it is seen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from megaflow.contract import SchedulerService
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
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "duration_s": round(result.duration_s, 4),
        "setup_s": round(result.setup_s, 4),
        "teardown_s": round(result.teardown_s, 4),
        "attempt_id": result.attempt_id,
    }


def trajectory_record(trajectory: common_pb2.Trajectory) -> dict[str, Any]:
    return MessageToDict(trajectory, preserving_proto_field_name=True)


@dataclass
class RunSummary:
    run_id: str = ""
    total: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0
    wall_s: float = 0.0
    model_utilisation: float | None = None  # embedded simulated model only

    @property
    def finished(self) -> int:
        return len(self.records)

    def count(self, status: str, error_kind: str | None = None) -> int:
        return sum(
            1
            for r in self.records
            if r["status"] == status and (error_kind is None or r["error_kind"] == error_kind)
        )

    @property
    def mean_reward(self) -> float | None:
        rewards = [r["reward"] for r in self.records if r["reward"] is not None]
        return sum(rewards) / len(rewards) if rewards else None


async def run_batch(
    scheduler: SchedulerService,
    tasks: list[common_pb2.TaskSpec],
    out_dir: Path,
    *,
    max_concurrency: int = 0,
    on_event: Callable[[scheduler_pb2.TaskEvent, RunSummary], None] | None = None,
) -> RunSummary:
    """Run `tasks` to terminal states and write `out_dir/{results,trajectories}.jsonl`."""
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the run
    started = time.monotonic()
    reply = await scheduler.submit_tasks(
        scheduler_pb2.SubmitTasksRequest(tasks=tasks, max_concurrency=max_concurrency)
    )
    summary = RunSummary(run_id=reply.run_id, total=len(reply.task_ids))
    written: set[str] = set()
    with (
        (out_dir / "results.jsonl").open("w") as results,
        (out_dir / "trajectories.jsonl").open("w") as trajectories,
    ):
        async for event in scheduler.watch_events(
            scheduler_pb2.WatchEventsRequest(run_id=reply.run_id)
        ):
            if event.type == scheduler_pb2.EVENT_TYPE_TASK_RETRYING:
                summary.retries += 1
            elif event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                if event.task_id in written:
                    continue  # replayed after a reconnection: written already
                written.add(event.task_id)
                record = result_record(event.result)
                summary.records.append(record)
                results.write(json.dumps(record) + "\n")
                results.flush()
                traj = trajectory_record(event.trajectory) if event.HasField("trajectory") else {}
                traj.setdefault("task_id", event.task_id)
                trajectories.write(json.dumps(traj) + "\n")
                trajectories.flush()
            if on_event is not None:
                on_event(event, summary)
            if event.type == scheduler_pb2.EVENT_TYPE_RUN_FINISHED:
                break
    summary.wall_s = time.monotonic() - started
    return summary
