"""Resume through the whole embedded system, with real local (bubblewrap) sandboxes.

A task's first attempt loses its model after k turns (an infrastructure error); the
scheduler retries it; the second attempt gets the checkpoint the first left in the
ledger, replays the recorded actions into a fresh sandbox (each observation verified),
and continues. It calls the model fewer times than a run from scratch, scores the same
reward as an undisturbed run, and its trajectory is one continuous history with the
resumption marked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from megaflow.core.errors import ModelUnavailableError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.service import EnvServiceConfig
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.scripted import tool_call
from megaflow.v1 import common_pb2, model_pb2, scheduler_pb2
from tests.agent.test_checkpoint import CountingBackend

pytestmark = pytest.mark.integration

K = 2  # turns the first attempt completes before its model fails


async def _run(
    tmp: Path, backend: CountingBackend | StampBackend, tasks: list[common_pb2.TaskSpec]
) -> tuple[RunSummary, dict[str, common_pb2.Trajectory]]:
    trajectories: dict[str, common_pb2.Trajectory] = {}

    def keep(event: scheduler_pb2.TaskEvent, _: RunSummary) -> None:
        if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
            trajectories[event.task_id] = event.trajectory

    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=tmp / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=tmp / "sandboxes"),
        policy=SchedulerPolicy(default_max_attempts=3, retry_base_s=0.01),
    )
    async with system:
        summary = await run_batch(system.scheduler, tasks, tmp / "out", on_event=keep)
        assert system.env.live == 0
    return summary, trajectories


async def test_a_retried_task_resumes_from_its_checkpoint_in_a_real_sandbox(
    tmp_path: Path,
) -> None:
    tasks = generate_tasks(2, seed=11)
    undisturbed = CountingBackend()
    base, base_trajectories = await _run(tmp_path / "undisturbed", undisturbed, tasks)
    flaky = CountingBackend(fail_at=K)
    summary, trajectories = await _run(tmp_path / "interrupted", flaky, tasks)

    assert summary.retries == len(tasks)
    base_records = {r["task_id"]: r for r in base.records}
    for record in summary.records:
        task_id = record["task_id"]
        scratch_calls = undisturbed.calls[task_id]
        assert scratch_calls >= K + 2
        resumed_calls = flaky.calls[task_id] - (K + 1)  # the first attempt made K + 1
        assert resumed_calls == scratch_calls - K < scratch_calls
        assert record["status"] == "succeeded" and record["attempts"] == 2
        assert record["reward"] == base_records[task_id]["reward"] == 1.0
        assert record["steps"] == scratch_calls

        trajectory, reference = trajectories[task_id], base_trajectories[task_id]
        assert [t.response.SerializeToString() for t in trajectory.turns] == [
            t.response.SerializeToString() for t in reference.turns
        ]
        assert [t.index for t in trajectory.turns] == list(range(scratch_calls))
        # observations of the resumed attempt match the undisturbed run's (test timings
        # aside): the replayed sandbox was in the same state
        assert _observations(trajectory) == _observations(reference)
        assert _untimed(trajectory.messages) == _untimed(reference.messages)
        (resumption,) = trajectory.resumptions
        assert resumption.at_turn == K
        assert resumption.from_attempt_id == f"{task_id}#1"
        assert resumption.attempt_id == trajectory.attempt_id == f"{task_id}#2"
        assert resumption.method == "replay" and resumption.replayed_actions >= 1
        assert not reference.resumptions


def _untimed(messages: Sequence[common_pb2.ChatMessage]) -> list[str]:
    """The contents with test timings ("Ran 9 tests in 0.001s") taken out: the commands
    after the resumption run live in both runs."""
    return [re.sub(r"in \d+\.\d+s", "in Xs", m.content) for m in messages]


def _observations(trajectory: common_pb2.Trajectory) -> list[list[str]]:
    return [_untimed(t.observations) for t in trajectory.turns]


class StampBackend:
    """Test-only model: writes a nanosecond stamp to a file (a state change whose output
    no replay reproduces), reads it back, then submits; the first call of the third turn
    fails once. Its next message depends only on the conversation, so it can resume."""

    kind = "stamp"
    name, version = "stamp", "stamp-1"

    def __init__(self) -> None:
        self.calls = 0
        self.failed = False

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        self.calls += 1
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 2 and not self.failed:
            self.failed = True
            raise ModelUnavailableError("injected: replica lost")
        message = [
            tool_call("bash", command="date +%s%N | tee stamp"),
            tool_call("bash", command="cat stamp"),
            tool_call("submit"),
        ][turn]
        return model_pb2.GenerateResponse(message=message, model=self.name, model_version="s")

    def stats(self) -> model_pb2.ModelStats:
        return model_pb2.ModelStats(requests=self.calls)

    async def close(self) -> None:
        return None


async def test_a_checkpoint_that_does_not_replay_falls_back_to_a_fresh_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = StampBackend()
    with caplog.at_level("WARNING", logger="megaflow.agent.session"):
        summary, trajectories = await _run(tmp_path, backend, generate_tasks(1, seed=12))
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["attempts"] == 2
    assert "cannot resume" in caplog.text and "observation differs" in caplog.text
    assert backend.calls == 3 + 3  # attempt 1: 2 turns + the failed call; then from scratch
    (trajectory,) = trajectories.values()
    assert not trajectory.resumptions and len(trajectory.turns) == 3
    assert trajectory.attempt_id.endswith("#2")
    stamp, read = (t.observations[0].content for t in trajectory.turns[:2])
    assert stamp.strip() == read.strip()  # the fresh sandbox's own stamp, read back
