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
