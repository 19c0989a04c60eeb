"""mini-swe-agent (PyPI, pinned, unmodified) as a scaffold: its agent loop drives real
`swe-synth` tasks through the embedded system (real local sandboxes, the hidden tests),
its commands through the session's step API and its model calls by its own litellm
model class over HTTP to the task's gateway endpoint, so every turn is recorded with
token ids and logprobs; its config passes through."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

from megaflow.agent import mini_swe_agent as scaffold_module
from megaflow.agent.model_endpoint import TaskModelEndpoint
from megaflow.agent.scaffold import SCAFFOLDS
from megaflow.core.errors import ModelUnavailableError
from megaflow.deploy.run import RunSummary
from megaflow.model.backend import ModelBackend
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.embedded_runs import run_keeping_trajectories
from megaflow.testing.scripted import ScriptedBackend
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2

pytest.importorskip("minisweagent")
pytestmark = pytest.mark.integration

SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
TEXT_MODE = {"config": ["mini_textbased.yaml"], "model": {"model_class": "litellm_textbased"}}


async def _run(
    tmp_path: Path, backend: ModelBackend, tasks: list[common_pb2.TaskSpec], concurrency: int = 4
) -> tuple[RunSummary, dict[str, common_pb2.Trajectory]]:
    return await run_keeping_trajectories(
        tmp_path, backend, tasks, concurrency=concurrency, max_attempts=2
    )


def _tasks(n: int, config: dict[str, object] | None, seed: int = 11) -> list[common_pb2.TaskSpec]:
    tasks = generate_tasks(n, seed=seed)
    for task in tasks:
        task.scaffold.type = "mini-swe-agent"
        task.scaffold.config_json = json.dumps(config) if config is not None else ""
    return tasks


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("mini-swe-agent:")}


async def _threads_end() -> None:
    """The threads of mini-swe-agent's loops end (the scaffold does not wait for them:
    a thread ends at its next step, or when its model call in flight fails)."""
    for _ in range(100):
        if not _threads():
            return
        await asyncio.sleep(0.1)
    assert not _threads()


@pytest.fixture
def endpoints(monkeypatch: pytest.MonkeyPatch) -> list[TaskModelEndpoint]:
    """Every task model endpoint the scaffold opens, kept for the test to inspect."""
    opened: list[TaskModelEndpoint] = []

    class Recorded(TaskModelEndpoint):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            opened.append(self)

    monkeypatch.setattr(scaffold_module, "TaskModelEndpoint", Recorded)
    return opened


async def test_text_mode_drives_tasks_to_hidden_test_rewards(
    tmp_path: Path, endpoints: list[TaskModelEndpoint]
) -> None:
    """12 tasks, mini-swe-agent's text-based config, the simulated model in its format;
    every model call an HTTP request of its litellm model to the task's endpoint."""
    assert "mini-swe-agent" in SCAFFOLDS.names()
    backend = SimulatedBackend.fast(success_rate=0.5, seed=4)
    tasks = _tasks(12, TEXT_MODE)
    summary, trajectories = await _run(tmp_path, backend, tasks)
    assert summary.finished == 12
    expected = {t.task_id: 1.0 if backend.policy.solves(t.task_id) else 0.0 for t in tasks}
    assert 0.0 in expected.values() and 1.0 in expected.values()
    for record in summary.records:
        assert record["status"] == "succeeded", record  # submitted; scored by the hidden tests
        assert record["reward"] == expected[record["task_id"]]
    for task in tasks:
        trajectory = trajectories[task.task_id]
        assert trajectory.messages[0].role == "system"
        assert "mswea_bash_command" in trajectory.messages[0].content  # mini-swe-agent's prompt
        assert "Please solve this issue: " in trajectory.messages[1].content
        turns = trajectory.turns
        assert len(turns) == 4  # read, edit, test, submit
        for turn in turns:
            assert not turn.response.tool_calls  # text mode: a fenced block
            assert len(re.findall(r"```mswea_bash_command\s*\n", turn.response.content)) == 1
            assert turn.completion_token_ids and turn.prompt_token_ids
            assert len(turn.completion_logprobs) == len(turn.completion_token_ids)
            assert turn.model_version == "sim-1"
        commands = [a.command for t in turns for a in t.actions]
        assert [a.kind for t in turns for a in t.actions] == ["execute"] * 4
        assert "cat " in commands[0] and "unittest" in commands[2] and SUBMIT in commands[3]
        # mini-swe-agent's observation template, fed back as user messages
        observations = [m for m in trajectory.messages if m.role == "user"][1:]
        assert observations and observations[0].content.startswith("<returncode>0</returncode>")
        # ... and noted as each turn's observations, as the built-in agent's
        assert [len(t.observations) for t in turns] == [1, 1, 1, 0]  # submit: no observation
        assert turns[0].observations[0] == observations[0]
    # Each task's calls crossed its own HTTP endpoint (loopback TCP, the task's key): as
    # many requests reached the gateway's model service as turns were recorded.
    assert sorted(e.session.task_id for e in endpoints) == sorted(t.task_id for t in tasks)
    for endpoint in endpoints:
        task_id = endpoint.session.task_id
        assert endpoint.listen == "tcp" and endpoint.port > 0
        assert dict(endpoint.service.calls) == {task_id: len(trajectories[task_id].turns)}
    await _threads_end()


async def test_default_config_uses_its_bash_tool(tmp_path: Path) -> None:
    """mini-swe-agent's default config: a `bash` tool; submit is the same echo command."""
    backend = SimulatedBackend.fast(success_rate=1.0, seed=4)
    tasks = _tasks(2, None, seed=12)
    summary, trajectories = await _run(tmp_path, backend, tasks)
    assert [r["status"] for r in summary.records] == ["succeeded"] * 2
    assert [r["reward"] for r in summary.records] == [1.0] * 2
    for trajectory in trajectories.values():
        calls = [c for t in trajectory.turns for c in t.response.tool_calls]
        assert {c.name for c in calls} == {"bash"}
        assert json.loads(calls[-1].arguments_json)["command"] == SUBMIT
        tool_results = [m for m in trajectory.messages if m.role == "tool"]
        assert tool_results and tool_results[0].tool_call_id == calls[0].id


async def test_its_swebench_config_runs_with_the_tasks_workdir(tmp_path: Path) -> None:
    """Its SWE-bench config (tool calls, a submit command shown in a block, cwd /testbed):
    the config is honoured; `environment.cwd: ""` keeps commands in the task's workdir."""
    backend = SimulatedBackend.fast(success_rate=1.0, seed=4)
    config = {"config": ["swebench.yaml"], "environment": {"cwd": ""}}
    tasks = _tasks(1, config, seed=18)
    summary, trajectories = await _run(tmp_path, backend, tasks)
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["reward"] == 1.0
    trajectory = trajectories[tasks[0].task_id]
    assert "patch.txt" in trajectory.messages[1].content  # its SWE-bench instructions
    commands = [a.command for t in trajectory.turns for a in t.actions]
    assert "export BASH_ENV=/root/.bashrc" in commands[0] and commands[-1].endswith(f"{SUBMIT}\n)")


async def test_its_cost_limit_counts_the_prices_of_its_model_registry(tmp_path: Path) -> None:
    """cost_limit (its own) with a price from its litellm_model_registry (litellm's cost
    calculation, as mini-swe-agent uses it): 1 output token costs 1, the limit is 1, so
    it stops after one turn; the scaffold still submits and the tests score it."""
    registry = tmp_path / "registry.json"
    name = "megaflow-test-priced"  # its own name: litellm's registry is process-wide
    price = {"input_cost_per_token": 0.0, "output_cost_per_token": 1.0}
    entry = {**price, "litellm_provider": "openai", "mode": "chat"}
    registry.write_text(json.dumps({f"openai/{name}": entry}))
    model = {**TEXT_MODE["model"], "model_name": name, "litellm_model_registry": str(registry)}
    config = {**TEXT_MODE, "model": model, "agent": {"cost_limit": 1.0}}
    tasks = _tasks(1, config, seed=19)
    backend = SimulatedBackend.fast(success_rate=1.0, seed=4)
    summary, trajectories = await _run(tmp_path, backend, tasks)
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["reward"] == 0.0  # read, no fix
    assert len(trajectories[tasks[0].task_id].turns) == 1


async def test_its_step_limit_ends_the_run_and_the_tests_score_it(tmp_path: Path) -> None:
    """step_limit 2 (its own limit): it stops before testing; the scaffold still submits."""
    backend = SimulatedBackend.fast(success_rate=1.0, seed=4)
    tasks = _tasks(1, {**TEXT_MODE, "agent": {"step_limit": 2}}, seed=13)
    summary, trajectories = await _run(tmp_path, backend, tasks)
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["reward"] == 1.0  # read + edit: fixed
    assert len(trajectories[tasks[0].task_id].turns) == 2


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"agent": {"step_limit": "many"}}, "agent.step_limit: Input should be a valid integer"),
        ({"environment": {"timeout": -1}}, "environment.timeout: Input should be greater than 0"),
        ({"config": ["no_such_config.yaml"]}, "mini-swe-agent config 'no_such_config.yaml'"),
        ({"agnet": {}}, "agnet: Extra inputs are not permitted"),
        (
            {"model": {"model_class": "openrouter"}},
            "model.model_class: mini-swe-agent's 'openrouter' (minisweagent.models."
            "openrouter_model.OpenRouterModel) does not call an OpenAI chat endpoint",
        ),
        ({"model": {"model_class": "litellm_response"}}, "MegaFlow serves 'litellm', "),
        ({"model": {"model_class": "my.missing.Model"}}, "no such class 'my.missing.Model'"),
        ({"model": {"model_class": "json.JSONDecoder"}}, "'json.JSONDecoder' is not a litellm"),
        ({"model": {"cost_tracking": "never"}}, "model.cost_tracking: Input should be"),
        ({"model": {"output_cost_per_token": 1}}, "model.output_cost_per_token: prices are"),
    ],
)
async def test_a_bad_config_is_invalid_and_names_the_field(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    tasks = _tasks(1, config)
    summary, _ = await _run(tmp_path, SimulatedBackend.fast(), tasks)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_kind"] == "invalid"
    assert record["reward"] is None
    assert message in record["error"]


def _block(command: str) -> common_pb2.ChatMessage:
    content = f"THOUGHT: next.\n\n```mswea_bash_command\n{command}\n```"
    return common_pb2.ChatMessage(role="assistant", content=content)


async def test_format_errors_and_subshells_behave_as_in_mini_swe_agent(tmp_path: Path) -> None:
    """A reply without a block gets its format-error message back; `cd` and variables do
    not persist between actions (a fresh subshell each, as its environments)."""
    script = [
        common_pb2.ChatMessage(role="assistant", content="I forgot the block."),
        _block("cd tests && export X=1 && pwd"),
        _block('pwd; echo "X=${X:-unset} PAGER=$PAGER"'),
        _block(SUBMIT),
    ]
    tasks = _tasks(1, TEXT_MODE, seed=14)
    summary, trajectories = await _run(tmp_path, ScriptedBackend(lambda _, i: script[i]), tasks)
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["reward"] == 0.0  # nothing fixed
    trajectory = trajectories[tasks[0].task_id]
    # mini-swe-agent drops the bad reply and sends its format-error message: the model
    # sees exactly that (the session starts a new conversation, recorded whole).
    second = trajectory.turns[1].prompt_delta
    assert [m.role for m in second] == ["system", "user", "user"]
    assert "EXACTLY ONE action in triple backticks, found 0 actions" in second[2].content
    assert "I forgot the block." not in [m.content for m in second]
    assert not trajectory.turns[0].actions  # the format error ran nothing
    first, second = trajectory.turns[1].actions[0], trajectory.turns[2].actions[0]
    assert first.observation.strip() == "/workspace/tests"
    # a fresh subshell: back in the workspace, no X; its config's env (PAGER) is set
    assert second.observation.split() == ["/workspace", "X=unset", "PAGER=cat"]


async def test_the_sessions_budgets_still_apply(tmp_path: Path) -> None:
    """max_steps of the task (not mini-swe-agent's): a task failure with reward 0."""
    tasks = _tasks(1, TEXT_MODE, seed=15)
    tasks[0].budgets.max_steps = 3
    backend = ScriptedBackend(lambda _, i: _block("ls"))
    summary, _ = await _run(tmp_path, backend, tasks)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_kind"] == "task"
    assert record["reward"] == 0.0 and "step limit of 3" in record["error"]
    await _threads_end()


async def test_the_task_deadline_stops_its_thread(tmp_path: Path) -> None:
    """A command outlasting the task's deadline: the task fails on time and the thread of
    mini-swe-agent's loop ends (its call is cancelled; it makes no further call)."""
    tasks = _tasks(1, {**TEXT_MODE, "environment": {"timeout": 60}}, seed=16)
    tasks[0].budgets.task_timeout_s = 2
    tasks[0].budgets.step_timeout_s = 60
    backend = ScriptedBackend(lambda _, i: _block("sleep 30"))
    summary, _ = await _run(tmp_path, backend, tasks)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_kind"] == "task"
    assert "deadline" in record["error"]
    assert backend.calls[tasks[0].task_id] == 1
    await _threads_end()


class _FailsOnce(SimulatedBackend):
    """The simulated model, losing each task's third call once (as a lost replica)."""

    def __init__(self) -> None:
        base = SimulatedBackend.fast(success_rate=1.0, seed=4)
        super().__init__(success_rate=1.0, seed=4, latency=base.latency)
        self.calls: dict[str, int] = {}
        self.failed: set[str] = set()

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        n = self.calls[request.task_id] = self.calls.get(request.task_id, 0) + 1
        if n == 3 and request.task_id not in self.failed:
            self.failed.add(request.task_id)
            raise ModelUnavailableError("injected: replica lost")
        return await super().generate(request)


async def test_an_attempt_lost_to_the_model_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """mini-swe-agent has no resume code: the session replays its recorded turns and
    commands to it, and it goes on from there."""
    tasks = _tasks(2, TEXT_MODE, seed=17)
    summary, trajectories = await _run(tmp_path, _FailsOnce(), tasks)
    for record in summary.records:
        assert record["status"] == "succeeded" and record["reward"] == 1.0
        assert record["attempts"] == 2
    for trajectory in trajectories.values():
        (resumption,) = trajectory.resumptions
        assert resumption.at_turn == 2
        assert len(trajectory.turns) == 4
