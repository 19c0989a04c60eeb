"""The simulated model (a fixture): the `swe-synth` policy and the backend.

The policy is driven against real `swe-synth` tasks by a small fake environment:
files live in memory, edits are applied to them, and the visible and hidden tests
run for real with `python3 -m unittest` in a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

import pytest

from megaflow.agent import tools
from megaflow.core.errors import InvalidRequestError
from megaflow.model.backend import ModelBackend
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.tasks.swe_synth import generate_task, generate_tasks, reference_patch, wrong_patch
from megaflow.testing.simulated_model import (
    MAX_ACTIONS,
    SimulatedBackend,
    SimulatedPolicy,
    simulated_decode,
)
from megaflow.v1 import common_pb2, model_pb2

PYTHON = sys.executable  # as fast as it gets; the sandbox itself runs `python3`


# --------------------------------------------------------------------------- a fake environment


async def _unittest(files: dict[str, bytes], pattern: str) -> tuple[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        async with _procs():
            proc = await asyncio.create_subprocess_exec(
                *(PYTHON, "-m", "unittest", "discover", "-s", "tests", "-p", pattern),
                cwd=root,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
    return out.decode(), proc.returncode or 0


_SEMAPHORES: dict[int, asyncio.Semaphore] = {}


def _procs() -> asyncio.Semaphore:
    loop = id(asyncio.get_running_loop())
    return _SEMAPHORES.setdefault(loop, asyncio.Semaphore(os.cpu_count() or 4))


class FakeEnv:
    """In-memory files; `cat`, `grep`, the test command, `edit_file` and `submit`."""

    def __init__(self, task: common_pb2.TaskSpec, *, run_visible: bool = True) -> None:
        self.task = task
        self.run_visible = run_visible  # False: the visible tests "pass" without running
        self.files = dict(task.files)
        self.edits: list[tuple[str, str, str]] = []
        self.reward: float | None = None

    async def act(self, call: common_pb2.ToolCall) -> str:
        args = json.loads(call.arguments_json)
        if call.name == tools.BASH:
            words = shlex.split(args["command"])
            if words[0] == "cat":
                content = self.files.get(words[1])
                if content is None:
                    return f"cat: {words[1]}: No such file or directory\n[exit code 1]"
                return content.decode()
            if words[0] == "grep":
                needle = words[-2]
                hits = [
                    f"./{p}:1:{line}"
                    for p, c in sorted(self.files.items())
                    for line in c.decode().splitlines()
                    if needle in line
                ]
                return "\n".join(hits) if hits else "[exit code 1]"
            if "unittest" in words and not self.run_visible:
                return "Ran 5 tests\n\nOK"
            if "unittest" in words:
                out, rc = await _unittest(self.files, "test*.py")
                return out + (f"\n[exit code {rc}]" if rc else "")
            return f"bash: {words[0]}: command not found\n[exit code 127]"
        if call.name == tools.EDIT_FILE:
            text = self.files.get(args["path"], b"").decode()
            if text.count(args["old"]) != 1:
                return f"error: `old` occurs {text.count(args['old'])} times in {args['path']}"
            self.files[args["path"]] = text.replace(args["old"], args["new"]).encode()
            self.edits.append((args["path"], args["old"], args["new"]))
            return f"edited {args['path']}"
        assert call.name == tools.SUBMIT, call.name
        _, rc = await _unittest({**self.files, **dict(self.task.hidden_files)}, "test_hidden*.py")
        self.reward = 1.0 if rc == 0 else 0.0
        return f"submitted: reward {self.reward}"


async def drive(
    backend: SimulatedBackend, task: common_pb2.TaskSpec, env: FakeEnv | None = None
) -> tuple[FakeEnv, list[common_pb2.ChatMessage]]:
    """The agent loop in miniature: model turn, one tool call, its observation; until submit."""
    env = env or FakeEnv(task)
    messages = [
        common_pb2.ChatMessage(role="system", content="You fix bugs."),
        common_pb2.ChatMessage(role="user", content=task.problem_statement),
    ]
    for _ in range(task.budgets.max_steps):
        response = await backend.generate(
            model_pb2.GenerateRequest(
                task_id=task.task_id, messages=messages, tools=tools.tool_specs()
            )
        )
        message = response.message
        assert message.role == "assistant" and message.content
        assert len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.name in {tools.BASH, tools.EDIT_FILE, tools.SUBMIT}
        assert isinstance(json.loads(call.arguments_json), dict)
        messages.append(message)
        observation = await env.act(call)
        messages.append(
            common_pb2.ChatMessage(
                role="tool", content=observation, tool_call_id=call.id, name=call.name
            )
        )
        if call.name == tools.SUBMIT:
            return env, messages
    raise AssertionError("the policy never submitted")


def _calls(messages: list[common_pb2.ChatMessage]) -> list[common_pb2.ToolCall]:
    return [c for m in messages if m.role == "assistant" for c in m.tool_calls]


# --------------------------------------------------------------------------- the policy


def _task_with(policy: SimulatedPolicy, solved: bool) -> common_pb2.TaskSpec:
    return next(t for t in generate_tasks(40, seed=3) if policy.solves(t.task_id) is solved)


async def test_solves_when_it_decides_to() -> None:
    backend = SimulatedBackend.fast(success_rate=0.5, seed=1)
    task = _task_with(backend.policy, solved=True)
    env, messages = await drive(backend, task)
    assert env.reward == 1.0
    assert env.edits == [reference_patch(task)]
    calls = _calls(messages)
    assert [c.name for c in calls] == [tools.BASH, tools.EDIT_FILE, tools.BASH, tools.SUBMIT]
    path = reference_patch(task)[0]
    assert json.loads(calls[0].arguments_json) == {"command": f"cat {path}"}
    assert "unittest" in json.loads(calls[2].arguments_json)["command"]
    assert len({c.id for c in calls}) == len(calls)


async def test_applies_the_decoy_otherwise() -> None:
    backend = SimulatedBackend.fast(success_rate=0.5, seed=1)
    task = _task_with(backend.policy, solved=False)
    env, messages = await drive(backend, task)
    assert env.reward == 0.0
    assert env.edits == [wrong_patch(task)]
    assert len(_calls(messages)) == 4


async def test_solved_fraction_matches_success_rate() -> None:
    """200 real tasks, scored for real: reward == the policy's decision, fraction near 0.8."""
    rate, n = 0.8, 200
    backend = SimulatedBackend.fast(success_rate=rate, seed=42)
    tasks = generate_tasks(n, seed=9)
    envs = await asyncio.gather(*(drive(backend, t, FakeEnv(t, run_visible=False)) for t in tasks))
    rewards = [env.reward for env, _ in envs]
    assert rewards == [1.0 if backend.policy.solves(t.task_id) else 0.0 for t in tasks]
    fraction = sum(r or 0.0 for r in rewards) / n
    assert abs(fraction - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    stats = backend.stats()
    assert stats.requests == 4 * n and stats.in_flight == 0 and stats.queued == 0


def test_decisions_are_a_pure_function_of_seed_task_and_rate() -> None:
    ids = [f"task-{i}" for i in range(2000)]
    a, b = SimulatedPolicy(0.3, seed=5), SimulatedPolicy(0.3, seed=5)
    assert [a.solves(i) for i in ids] == [b.solves(i) for i in ids]
    assert [a.solves(i) for i in ids] != [SimulatedPolicy(0.3, seed=6).solves(i) for i in ids]
    assert abs(sum(a.solves(i) for i in ids) / len(ids) - 0.3) < 0.05
    # A higher rate solves a superset of the tasks.
    higher = SimulatedPolicy(0.6, seed=5)
    assert all(higher.solves(i) for i in ids if a.solves(i))
    assert not any(SimulatedPolicy(0.0, seed=5).solves(i) for i in ids)
    assert all(SimulatedPolicy(1.0, seed=5).solves(i) for i in ids)
    with pytest.raises(InvalidRequestError):
        SimulatedPolicy(1.5, seed=0)


async def test_same_conversation_same_answer() -> None:
    task = generate_task(0, 0)
    first, messages = await drive(SimulatedBackend.fast(seed=3), task)
    again, messages_again = await drive(SimulatedBackend.fast(seed=3), task)
    # Tool output can differ in timings ("Ran 14 tests in 0.001s"); the model's side may not.
    mine = [m for m in messages if m.role == "assistant"]
    assert mine == [m for m in messages_again if m.role == "assistant"]
    assert first.files == again.files


async def test_missing_file_falls_back_to_search() -> None:
    backend = SimulatedBackend.fast(success_rate=1.0)
    task = generate_task(0, 2)
    path, _, _ = reference_patch(task)
    moved = common_pb2.TaskSpec()
    moved.CopyFrom(task)
    moved.files["src/" + path] = moved.files[path]
    del moved.files[path]
    env, messages = await drive(backend, moved)
    names = [json.loads(c.arguments_json).get("command", c.name) for c in _calls(messages)]
    assert names[0] == f"cat {path}" and names[1].startswith("grep ")
    assert names[2] == f"cat src/{path}"
    assert env.edits and env.edits[0][0] == "src/" + path


async def test_gives_up_rather_than_loop() -> None:
    backend = SimulatedBackend.fast(success_rate=1.0)
    task = generate_task(0, 3)

    class Broken(FakeEnv):
        async def act(self, call: common_pb2.ToolCall) -> str:
            if call.name == tools.SUBMIT:
                self.reward = 0.0
                return "submitted"
            return "error: the sandbox is on fire\n[exit code 1]"

    env, messages = await drive(backend, task, Broken(task))
    assert env.reward == 0.0
    assert len(_calls(messages)) <= 4

    class EditsFail(FakeEnv):
        async def act(self, call: common_pb2.ToolCall) -> str:
            if call.name == tools.EDIT_FILE:
                return "error: permission denied"
            return await super().act(call)

    env, messages = await drive(backend, task, EditsFail(task))
    kinds = [c.name for c in _calls(messages)]
    assert kinds == ["bash", "edit_file", "bash", "edit_file", "bash", "submit"]
    assert env.reward == 0.0


async def test_already_fixed_file_is_submitted() -> None:
    backend = SimulatedBackend.fast(success_rate=0.0)
    task = generate_task(1, 1)
    path, old, new = reference_patch(task)
    env = FakeEnv(task)
    env.files[path] = env.files[path].decode().replace(old, new).encode()
    env, messages = await drive(backend, task, env)
    assert [c.name for c in _calls(messages)] == ["bash", "submit"]
    assert env.reward == 1.0


async def test_unknown_problem_and_step_cap() -> None:
    policy = SimulatedPolicy(0.8, seed=0)
    user = common_pb2.ChatMessage(role="user", content="Please make my website faster.")
    reply = policy.next_message("t", [user])
    assert reply.tool_calls[0].name == tools.SUBMIT
    task = generate_task(0, 0)
    messages = [common_pb2.ChatMessage(role="user", content=task.problem_statement)]
    for step in range(MAX_ACTIONS):
        call = common_pb2.ToolCall(
            id=f"c{step}", name=tools.BASH, arguments_json='{"command":"ls"}'
        )
        messages.append(common_pb2.ChatMessage(role="assistant", tool_calls=[call]))
        messages.append(common_pb2.ChatMessage(role="tool", tool_call_id=f"c{step}", content="x"))
    assert policy.next_message(task.task_id, messages).tool_calls[0].name == tools.SUBMIT


# --------------------------------------------------------------------------- the backend


async def test_backend_response_fields() -> None:
    backend: ModelBackend = SimulatedBackend.fast(name="sim", version="v9")
    assert (backend.name, backend.version, backend.kind) == ("sim", "v9", "simulated")
    task = generate_task(0, 5)
    messages = [
        common_pb2.ChatMessage(role="system", content="s" * 400),
        common_pb2.ChatMessage(role="user", content=task.problem_statement),
    ]
    response = await backend.generate(
        model_pb2.GenerateRequest(task_id=task.task_id, messages=messages)
    )
    assert response.model == "sim" and response.model_version == "v9"
    assert response.finish_reason == "tool_calls"
    prompt = "s" * 400 + task.problem_statement
    assert response.prompt_tokens == -(-len(prompt.encode()) // 4)
    assert simulated_decode(list(response.prompt_token_ids)) == prompt
    call = response.message.tool_calls[0]
    out = response.message.content + call.name + call.arguments_json
    assert response.completion_tokens == len(response.completion_token_ids)
    assert simulated_decode(list(response.completion_token_ids)) == out
    assert len(response.completion_logprobs) == response.completion_tokens
    assert all(-4.0 < lp <= 0.0 for lp in response.completion_logprobs)
    assert response.latency_s >= response.queue_s >= 0
    stats = backend.stats()
    assert isinstance(stats, model_pb2.ModelStats) and stats.requests == 1
    await backend.close()


async def test_backend_without_task_id_is_still_deterministic() -> None:
    backend = SimulatedBackend.fast()
    task = generate_task(0, 6)
    request = model_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=task.problem_statement)]
    )
    first = await backend.generate(request)
    second = await backend.generate(request)
    assert first.message == second.message
    with pytest.raises(InvalidRequestError):
        await backend.generate(model_pb2.GenerateRequest())


async def test_backend_latency_is_modelled() -> None:
    latency = GpuLatencyModel(
        LatencyConfig(slots=1, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    )
    backend = SimulatedBackend(success_rate=1.0, latency=latency)
    task = generate_task(0, 7)
    request = model_pb2.GenerateRequest(
        task_id=task.task_id,
        messages=[common_pb2.ChatMessage(role="user", content=task.problem_statement)],
    )
    responses = await asyncio.gather(*(backend.generate(request) for _ in range(3)))
    service = responses[0].completion_tokens * 0.001
    assert all(r.latency_s >= service * 0.9 for r in responses)
    assert max(r.queue_s for r in responses) >= 2 * service * 0.9  # one slot: the third waited
    assert backend.stats().utilisation > 0.5
    default = SimulatedBackend()
    assert default.latency.config == LatencyConfig()


# --------------------------------------------------------------------------- other tools, text mode

# qwen-code's shell tool (an extra required boolean), codex's argv `shell`, mini-swe-agent's bash.
QWEN_SHELL = common_pb2.ToolSpec(
    name="run_shell_command",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "is_background": {"type": "boolean"},
                "description": {"type": "string"},
            },
            "required": ["command", "is_background"],
        }
    ),
)
CODEX_SHELL = common_pb2.ToolSpec(
    name="shell",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}}},
            "required": ["command"],
        }
    ),
)
READ_FILE = common_pb2.ToolSpec(
    name="read_file",
    parameters_json_schema='{"type": "object", "properties": {"path": {"type": "string"}}}',
)
MINI_BASH = common_pb2.ToolSpec(
    name="bash",
    parameters_json_schema=json.dumps(
        {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
    ),
)
SUBMIT_WORD = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
# mini-swe-agent 2.4.6's text-based prompts, in short (config/mini_textbased.yaml).
MINI_SYSTEM = (
    "Your response must contain exactly ONE bash code block with ONE command.\n"
    "<format_example>\nTHOUGHT: why\n\n```mswea_bash_command\nyour_command_here\n```\n"
    "</format_example>"
)
MINI_INSTANCE = (
    "Please solve this issue: {task}\n\n6. Submit your changes and finish your work by issuing "
    f"the following command: `echo {SUBMIT_WORD}`.\n"
)
MINI_ACTION = r"```mswea_bash_command\s*\n(.*?)\n```"  # LitellmTextbasedModelConfig.action_regex


class ShellEnv:
    """A real directory and real `bash -c` for every command; the hidden tests at the end."""

    def __init__(self, task: common_pb2.TaskSpec, root: Path) -> None:
        self.task, self.root = task, root
        for rel, content in task.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        self.commands: list[str] = []

    async def run(self, command: str) -> tuple[str, int]:
        self.commands.append(command)
        async with _procs():
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                command.replace("python3", shlex.quote(PYTHON)),
                cwd=self.root,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
        return out.decode(), proc.returncode or 0

    async def reward(self) -> float:
        hidden = {**dict(self.task.hidden_files)}
        files = {
            str(p.relative_to(self.root)): p.read_bytes()
            for p in self.root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        _, rc = await _unittest({**files, **hidden}, "test_hidden*.py")
        return 1.0 if rc == 0 else 0.0


async def drive_tools(
    backend: SimulatedBackend,
    task: common_pb2.TaskSpec,
    env: ShellEnv,
    offered: list[common_pb2.ToolSpec],
    *,
    system: str = "You fix bugs.",
    tool_choice: str = "",
) -> list[common_pb2.ChatMessage]:
    """A CLI agent in miniature: tool calls until an answer without one (or a submit tool)."""
    messages = [
        common_pb2.ChatMessage(role="system", content=system),
        common_pb2.ChatMessage(role="user", content=task.problem_statement),
    ]
    for _ in range(20):
        request = model_pb2.GenerateRequest(
            task_id=task.task_id, messages=messages, tools=offered, tool_choice=tool_choice
        )
        response = await backend.generate(request)
        message = response.message
        messages.append(message)
        if not message.tool_calls:
            assert response.finish_reason == "stop"
            return messages
        assert response.finish_reason == "tool_calls"
        for call in message.tool_calls:
            args = json.loads(call.arguments_json)
            if call.name not in (QWEN_SHELL.name, CODEX_SHELL.name, MINI_BASH.name):
                return messages
            command = args["command"]
            if isinstance(command, list):
                assert command[:2] == ["bash", "-lc"]
                command = command[2]
            out, rc = await env.run(command)
            if SUBMIT_WORD in command:
                return messages
            messages.append(
                common_pb2.ChatMessage(
                    role="tool", content=f"{out}\nExit Code: {rc}", tool_call_id=call.id
                )
            )
    raise AssertionError("the policy never finished")


@pytest.mark.parametrize("solved", [True, False])
async def test_shell_tool_only_every_action_through_it(tmp_path: Path, solved: bool) -> None:
    """qwen-code's tools: reads, the edit and the tests through `run_shell_command`; no
    submit tool and no submit command: a final plain answer ends the session."""
    backend = SimulatedBackend.fast(success_rate=0.5, seed=1)
    task = _task_with(backend.policy, solved=solved)
    env = ShellEnv(task, tmp_path)
    messages = await drive_tools(backend, task, env, [READ_FILE, QWEN_SHELL])
    calls = _calls(messages)
    assert [c.name for c in calls] == ["run_shell_command"] * 3
    assert all(json.loads(c.arguments_json)["is_background"] is False for c in calls)
    path, old, new = (reference_patch if solved else wrong_patch)(task)
    assert env.commands[0] == f"cat {path}" and "unittest" in env.commands[2]
    assert new in (tmp_path / path).read_text() and old not in (tmp_path / path).read_text()
    assert messages[-1].role == "assistant" and not messages[-1].tool_calls
    assert await env.reward() == (1.0 if solved else 0.0)


async def test_codex_argv_shell_and_a_submit_tool(tmp_path: Path) -> None:
    backend = SimulatedBackend.fast(success_rate=1.0)
    task = generate_task(0, 4)
    env = ShellEnv(task, tmp_path)
    finish = common_pb2.ToolSpec(name="submit_solution", parameters_json_schema="{}")
    messages = await drive_tools(backend, task, env, [CODEX_SHELL, finish])
    assert [c.name for c in _calls(messages)] == ["shell"] * 3 + ["submit_solution"]
    assert await env.reward() == 1.0


async def test_mini_swe_agent_toolcall_mode_submits_with_its_command(tmp_path: Path) -> None:
    """Only `bash` offered (mini-swe-agent 2's default): the submit is the prompt's command."""
    backend = SimulatedBackend.fast(success_rate=1.0)
    task = generate_task(0, 5)
    env = ShellEnv(task, tmp_path)
    messages = await drive_tools(backend, task, env, [MINI_BASH], system=MINI_INSTANCE)
    assert [c.name for c in _calls(messages)] == ["bash"] * 4
    assert env.commands[1].startswith("python3 -c ")  # the edit, as a shell command
    assert env.commands[-1] == f"echo {SUBMIT_WORD}"
    assert await env.reward() == 1.0


@pytest.mark.parametrize("solved", [True, False])
async def test_text_mode_speaks_mini_swe_agents_format(tmp_path: Path, solved: bool) -> None:
    """No tools: a THOUGHT and one block in the prompt's fence, observations read back from
    user messages in mini-swe-agent's observation format; submit with its command."""
    import re

    backend = SimulatedBackend.fast(success_rate=0.5, seed=1)
    task = _task_with(backend.policy, solved=solved)
    env = ShellEnv(task, tmp_path)
    messages = [
        common_pb2.ChatMessage(role="system", content=MINI_SYSTEM),
        common_pb2.ChatMessage(
            role="user", content=MINI_INSTANCE.format(task=task.problem_statement)
        ),
    ]
    for _ in range(10):
        request = model_pb2.GenerateRequest(task_id=task.task_id, messages=messages)
        response = await backend.generate(request)
        message = response.message
        assert not message.tool_calls and response.finish_reason == "stop"
        assert message.content.startswith("THOUGHT: ")
        actions = re.findall(MINI_ACTION, message.content, re.DOTALL)
        assert len(actions) == 1
        messages.append(message)
        out, rc = await env.run(actions[0].strip())
        if actions[0].strip() == f"echo {SUBMIT_WORD}":
            break
        observation = f"<returncode>{rc}</returncode>\n<output>\n{out}</output>"
        messages.append(common_pb2.ChatMessage(role="user", content=observation))
    else:
        raise AssertionError("never submitted")
    assert len(env.commands) == 4 and "unittest" in env.commands[2]
    assert await env.reward() == (1.0 if solved else 0.0)


def test_tool_choice_is_honoured() -> None:
    policy = SimulatedPolicy(1.0)
    task = generate_task(0, 0)
    messages = [common_pb2.ChatMessage(role="user", content=task.problem_statement)]
    builtin = tools.tool_specs()
    # none: no tool call, even with tools offered
    reply = policy.next_message(task.task_id, messages, builtin, "none")
    assert not reply.tool_calls and "```bash\ncat " in reply.content
    # auto / empty / required with the built-in tools: as before
    for choice in ("", "auto", "required"):
        reply = policy.next_message(task.task_id, messages, builtin, choice)
        assert reply.tool_calls[0].name == tools.BASH
    # a named function: only that one
    reply = policy.next_message(task.task_id, messages, builtin, tools.SUBMIT)
    assert reply.tool_calls[0].name == tools.SUBMIT
    reply = policy.next_message(task.task_id, messages, [READ_FILE, QWEN_SHELL], "shell")
    assert not reply.tool_calls  # not offered: nothing can be called
    # required with a shell tool and nothing to submit with: the final words as a command
    unknown = [common_pb2.ChatMessage(role="user", content="Make my website faster.")]
    assert not policy.next_message("t", unknown, [QWEN_SHELL]).tool_calls
    reply = policy.next_message("t", unknown, [QWEN_SHELL], "required")
    command = json.loads(reply.tool_calls[0].arguments_json)["command"]
    assert reply.tool_calls[0].name == QWEN_SHELL.name and command.startswith("echo ")


def test_edit_failure_is_read_from_shell_output() -> None:
    policy = SimulatedPolicy(1.0)
    task = generate_task(0, 0)
    path = reference_patch(task)[0]
    messages = [common_pb2.ChatMessage(role="user", content=task.problem_statement)]
    for step, output in enumerate([task.files[path].decode(), "error: old text occurs 0 times"]):
        reply = policy.next_message(task.task_id, messages, [QWEN_SHELL])
        messages.append(reply)
        call = reply.tool_calls[0]
        messages.append(common_pb2.ChatMessage(role="tool", tool_call_id=call.id, content=output))
        assert call.id.endswith(f"_{step}")
    reply = policy.next_message(task.task_id, messages, [QWEN_SHELL])
    assert json.loads(reply.tool_calls[0].arguments_json)["command"] == f"cat {path}"
