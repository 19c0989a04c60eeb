"""Run tasks through a whole embedded system (real local sandboxes) in a test, keeping
each task's final trajectory: what the scaffold tests (built-in, plug-in, mini-swe-agent)
check their runs with."""

from __future__ import annotations

from pathlib import Path

from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.service import EnvServiceConfig
from megaflow.model.backend import ModelBackend
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.v1 import common_pb2


async def run_keeping_trajectories(
    tmp_path: Path,
    backend: ModelBackend,
    tasks: list[common_pb2.TaskSpec],
    *,
    concurrency: int = 2,
    max_attempts: int = 3,
) -> tuple[RunSummary, dict[str, common_pb2.Trajectory]]:
    """Run `tasks` against `backend` (ledger, sandboxes and results under `tmp_path`);
    the summary and the trajectory each task ended with, by task id."""
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=tmp_path / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=tmp_path / "sb"),
        policy=SchedulerPolicy(default_max_attempts=max_attempts, retry_base_s=0.01),
    )
    trajectories: dict[str, common_pb2.Trajectory] = {}

    def keep(event: object, summary: RunSummary) -> None:
        trajectory = getattr(event, "trajectory", None)
        if trajectory is not None and trajectory.task_id:
            trajectories[trajectory.task_id] = trajectory

    async with system:
        summary = await run_batch(
            system.scheduler, tasks, tmp_path / "out", max_concurrency=concurrency, on_event=keep
        )
    return summary, trajectories
