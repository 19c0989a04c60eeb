"""The command scaffold: CLI agents run inside real local sandboxes, their model calls
through the task's own endpoint (a unix socket bound into the sandbox), end to end
through the embedded system.

The Qwen Code test runs the real CLI from npm (installed by ``./dev setup`` / ``./dev
test`` into /opt/megaflow/npm) against the simulated model; the other tests use small
shell commands (curl) as the "agent".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from megaflow.agent.command_scaffold import AGENT_PREFIX
from megaflow.agent.session import AgentLimits
from megaflow.core.errors import ModelUnavailableError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.service import EnvServiceConfig
from megaflow.model.backend import ModelBackend
from megaflow.model.latency import GpuLatencyModel
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.scripted import ScriptedBackend
from megaflow.testing.simulated_model import SimulatedBackend

pytestmark = pytest.mark.integration

QWEN = Path(AGENT_PREFIX) / "bin" / "qwen"
needs_tools = pytest.mark.skipif(
    shutil.which("socat") is None or shutil.which("curl") is None,
    reason="socat and curl are needed (./dev setup installs socat)",
)

CHAT = (
    'curl -sS -H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" '
    '"$OPENAI_BASE_URL/chat/completions" -d {body}'
)


def _chat(*messages: dict[str, str], key: str = "$OPENAI_API_KEY") -> str:
    body = json.dumps({"model": "m", "messages": list(messages)})
    return CHAT.replace("$OPENAI_API_KEY", key).format(body=f"'{body}'")


# A conversation as a CLI holds it: the model's reply is sent back with the next call.
CONVERSATION = """python3 - <<'PY'
import json, os, urllib.request
def chat(messages):
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps({"model": "m", "messages": messages}).encode(),
        headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                 "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request))["choices"][0]["message"]
messages = [{"role": "user", "content": "hello"}]
messages.append(chat(messages))
messages.append({"role": "user", "content": "more"})
chat(messages)
PY"""


async def _run(
    tmp_path: Path,
    n: int,
    scaffold: str,
    config: dict[str, Any],
    *,
    task_timeout_s: float = 300.0,
    max_steps: int = 0,
    concurrency: int = 2,
    backend: ModelBackend | None = None,
) -> tuple[RunSummary, list[dict[str, Any]]]:
    # the simulated GPU's latency scaled down: the CLI's own time is what this tests
    backend = backend or SimulatedBackend(
        success_rate=1.0, latency=GpuLatencyModel(time_scale=0.05)
    )
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=tmp_path / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=tmp_path / "sb"),
        agent_limits=AgentLimits(),
        policy=SchedulerPolicy(default_max_attempts=2, retry_base_s=0.01),
    )
    async with system:
        tasks = generate_tasks(n, seed=11)
        for task in tasks:
            task.scaffold.type = scaffold
            task.scaffold.config_json = json.dumps(config)
            task.budgets.task_timeout_s = task_timeout_s
            if max_steps:
                task.budgets.max_steps = max_steps
        summary = await run_batch(
            system.scheduler, tasks, tmp_path / "out", max_concurrency=concurrency
        )
    with (tmp_path / "out" / "trajectories.jsonl").open() as f:
        trajectories = [json.loads(line) for line in f]
    _assert_nothing_left(tmp_path / "sb")
    return summary, trajectories


def _assert_nothing_left(root: Path) -> None:
    """No sandbox folder (hence no socket file) remains, and no socket anywhere under it."""
    left = list(root.iterdir()) if root.exists() else []
    assert left == [], f"left behind: {left}"


def _assert_recorded(trajectory: dict[str, Any]) -> None:
    """Every turn went through the session: token ids and logprobs, model version."""
    turns = trajectory["turns"]
    assert turns
    for turn in turns:
        assert turn["completion_token_ids"], turn
        assert len(turn["completion_logprobs"]) == len(turn["completion_token_ids"])
        assert turn["prompt_token_ids"]
        assert turn["model_version"] == "sim-1"


@needs_tools
async def test_a_script_reaches_the_model_only_through_its_endpoint(tmp_path: Path) -> None:
    # Two calls of one conversation, then an unrelated one; a call without the task's
    # key is refused; nothing else is reachable from inside (no network).
    command = "\necho\n".join(
        [
            CONVERSATION,
            _chat({"role": "user", "content": "a side question"}),
            _chat({"role": "user", "content": "hello"}, key="wrong-key"),
            "curl -sS -m 2 http://1.1.1.1/ >/dev/null 2>&1 && echo NET-OPEN || echo no-network",
            "ls /run/megaflow",
        ]
    )
    summary, trajectories = await _run(
        tmp_path, 2, "command", {"command": command, "score_on_failure": True}
    )
    assert summary.total == 2
    for record, trajectory in zip(summary.records, trajectories, strict=True):
        assert record["status"] == "succeeded", record
        assert record["reward"] == 0.0  # the script fixes nothing: the hidden tests fail
        _assert_recorded(trajectory)
        turns = trajectory["turns"]
        assert len(turns) == 3  # the refused call is no turn
        assert [m["content"] for m in turns[0]["prompt_delta"]] == ["hello"]
        # the second call extended the conversation (the model's own reply, then more):
        # only what is new is the turn's delta
        assert [m["content"] for m in turns[1]["prompt_delta"]] == ["more"]
        # the third did not: a new conversation, sent whole
        assert [m["content"] for m in turns[2]["prompt_delta"]] == ["a side question"]
        (action,) = turns[-1]["actions"]
        output = action["observation"]
        assert "invalid_api_key" in output
        assert "no-network" in output and "NET-OPEN" not in output
        assert "model.sock" in output
        assert "mf-" not in action["command"]  # the key came from its file


@needs_tools
async def test_failing_hanging_and_over_budget_commands_end_clearly(tmp_path: Path) -> None:
    failing, _ = await _run(tmp_path / "a", 1, "command", {"command": "echo boom >&2; exit 3"})
    (record,) = failing.records
    assert (record["status"], record["error_kind"], record["reward"]) == ("failed", "task", 0.0)
    assert "exited with 3" in record["error"] and "boom" in record["error"]

    hanging, _ = await _run(tmp_path / "b", 1, "command", {"command": "sleep 600", "timeout_s": 2})
    (record,) = hanging.records
    assert (record["status"], record["error_kind"], record["reward"]) == ("failed", "task", 0.0)
    assert "did not finish within 2s" in record["error"]

    # A CLI that keeps calling past the step budget is stopped by the session's limit.
    loop = f"while true; do {_chat({'role': 'user', 'content': 'again'})} >/dev/null; done"
    over, trajectories = await _run(tmp_path / "c", 1, "command", {"command": loop}, max_steps=3)
    (record,) = over.records
    assert (record["status"], record["error_kind"], record["reward"]) == ("failed", "task", 0.0)
    assert "step limit of 3" in record["error"]
    assert len(trajectories[0]["turns"]) == 3


@needs_tools
async def test_a_model_failure_stops_the_command_and_is_retried_never_scored(
    tmp_path: Path,
) -> None:
    failing = ScriptedBackend(lambda task, i: ModelUnavailableError("upstream 503"))
    hello = _chat({"role": "user", "content": "hello"})
    summary, _ = await _run(
        tmp_path, 1, "command", {"command": f"{hello}; sleep 600"}, backend=failing
    )
    (record,) = summary.records
    assert (record["status"], record["error_kind"], record["reward"]) == ("failed", "infra", None)
    assert record["attempts"] == 2  # retried (the policy allows two), then no result
    assert "upstream 503" in record["error"]


@needs_tools
@pytest.mark.timeout(540)  # ten real CLI agents (Node) on a small machine
@pytest.mark.skipif(not QWEN.exists(), reason=f"Qwen Code is not installed at {QWEN}: ./dev setup")
async def test_qwen_code_drives_tasks_to_scored_results(tmp_path: Path) -> None:
    summary, trajectories = await _run(
        tmp_path, 10, "qwen-code", {}, task_timeout_s=240.0, max_steps=12, concurrency=3
    )
    assert summary.total == 10 and summary.finished == 10
    by_task = {t["task_id"]: t for t in trajectories}
    for record in summary.records:
        # a terminal state with a reward from the hidden tests (or a task failure with
        # reward 0 that says why): never an infrastructure failure or a crash
        assert record["status"] in ("succeeded", "failed"), record
        assert record["error_kind"] in ("none", "task"), record
        assert record["reward"] is not None
        trajectory = by_task[record["task_id"]]
        _assert_recorded(trajectory)
        turns = trajectory["turns"]
        system = turns[0]["prompt_delta"][0]
        assert system["role"] == "system" and "Qwen Code" in system["content"]
        # Qwen Code sends its whole history each time; the session got only what was new
        assert all(m["role"] != "system" for t in turns[1:] for m in t["prompt_delta"])
    solved = [r for r in summary.records if r["reward"] == 1.0]
    assert solved, [r["error"] for r in summary.records]
