"""How task outcomes are classified, end to end through the embedded system.

Task-caused endings (step limit) are final with reward 0; infrastructure failures
(a model that errors) are retried and, when retries run out, recorded with no
reward — never as reward 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.agent.session import AgentLimits
from megaflow.core.errors import ModelUnavailableError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.service import EnvServiceConfig
from megaflow.model.backend import ModelBackend
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.tasks.swe_synth import generate_tasks, reference_patch
from megaflow.testing.scripted import ScriptedBackend, Step, tool_call
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration


async def _run(tmp_path: Path, backend: ModelBackend, n: int = 2) -> RunSummary:
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=tmp_path / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=tmp_path / "sb"),
        agent_limits=AgentLimits(max_steps=3),
        policy=SchedulerPolicy(default_max_attempts=3, retry_base_s=0.01),
    )
    async with system:
        tasks = generate_tasks(n, seed=7)
        for t in tasks:
            t.budgets.max_steps = 3
        return await run_batch(system.scheduler, tasks, tmp_path / "out", max_concurrency=2)


async def test_step_limit_is_a_task_failure_with_reward_zero(tmp_path: Path) -> None:
    backend = ScriptedBackend(lambda task, i: tool_call("bash", command="ls"))
    summary = await _run(tmp_path, backend)
    for record in summary.records:
        assert record["status"] == "failed"
        assert record["error_kind"] == "task"
        assert record["reward"] == 0.0
        assert record["attempts"] == 1  # final: not retried
        assert "step limit" in record["error"]


async def test_model_failures_are_retried_then_reported_without_reward(tmp_path: Path) -> None:
    backend = ScriptedBackend(lambda task, i: ModelUnavailableError("upstream 503"))
    summary = await _run(tmp_path, backend)
    assert summary.retries == 4  # 2 tasks x 2 retries
    for record in summary.records:
        assert record["status"] == "failed"
        assert record["error_kind"] == "infra"
        assert record["reward"] is None  # no result, not reward 0
        assert record["attempts"] == 3
        assert "upstream 503" in record["error"]


async def test_a_transient_failure_is_retried_and_the_task_then_scores(tmp_path: Path) -> None:
    task = generate_tasks(1, seed=7)[0]
    path, old, new = reference_patch(task)

    def script(task_id: str, i: int) -> Step:
        return [
            ModelUnavailableError("replica restarting"),  # attempt 1 dies here
            tool_call("edit_file", path=path, old=old, new=new),  # attempt 2
            tool_call("submit"),
        ][i]

    summary = await _run(tmp_path, ScriptedBackend(script), n=1)
    (record,) = summary.records
    assert record["status"] == "succeeded"
    assert record["reward"] == 1.0
    assert record["attempts"] == 2


async def test_bad_tool_calls_are_reported_to_the_agent_not_crashes(tmp_path: Path) -> None:
    def script(task_id: str, i: int) -> Step:
        bad = common_pb2.ChatMessage(
            role="assistant",
            tool_calls=[common_pb2.ToolCall(id="x", name="bash", arguments_json="{not json")],
        )
        return [bad, tool_call("teleport"), tool_call("submit")][i]

    summary = await _run(tmp_path, ScriptedBackend(script), n=1)
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["reward"] == 0.0  # buggy repo fails
    trajectory = (tmp_path / "out" / "trajectories.jsonl").read_text()
    assert "invalid arguments for bash" in trajectory
    assert "unknown tool 'teleport'" in trajectory
