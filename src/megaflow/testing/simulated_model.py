"""The simulated model: a scripted `swe-synth` policy behind a GPU latency model.

A fixture, and the embedded default's model (``megaflow run --model simulated``):
`megaflow.model.factory` registers `build_simulated` as the ``simulated`` backend by
its dotted path, so the model role never imports it. It lives here, above the roles it
plays against (the agent's tools, the `swe-synth` tasks).

`SimulatedPolicy` plays the `swe-synth` tasks (`megaflow.tasks.swe_synth`) the
way a small agent model would, reading real observations:

    1. bash `cat <path>`            (the file named by the problem statement)
    2. edit_file buggy -> fixed     (or -> the catalogue's decoy, when not solving)
    3. bash the visible tests
    4. submit

Whether a task is solved is a pure function of (seed, task_id, success_rate), so
over many tasks the solved fraction approaches `success_rate`. Anything
unexpected (an unreadable file, no buggy line, a failed edit) leads to a bounded
fallback and, at worst, `submit`: the policy never loops.

`SimulatedBackend` implements `ModelBackend` with the policy and a
`GpuLatencyModel` (`megaflow.model.latency`). It fills the token-fidelity fields from
a simulated tokenizer (`simulated_encode`: 4 UTF-8 bytes a token, reversible by
`simulated_decode`); the completion's token stream is the message content followed
by each tool call's name and arguments, and its logprobs are deterministic stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megaflow.agent import tools
from megaflow.core.errors import InvalidRequestError, ModelUnavailableError
from megaflow.core.shell import split_words
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.tasks.catalogue import locate_bug
from megaflow.tasks.swe_synth import VISIBLE_TEST_COMMAND, parse_problem_statement
from megaflow.v1 import common_pb2, model_pb2

if TYPE_CHECKING:
    from megaflow.model.factory import BackendOptions

__all__ = [
    "SimulatedBackend",
    "SimulatedPolicy",
    "build_simulated",
    "simulated_decode",
    "simulated_encode",
]

MAX_ACTIONS = 10  # past this many tool calls the policy always submits
_PY_PATH = re.compile(r"^\.?/?([\w./-]+\.py):")


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode()).digest()


@dataclass(frozen=True)
class _Action:
    kind: str  # read | search | edit | test | submit | other
    call: common_pb2.ToolCall
    arguments: dict[str, Any]
    observation: str | None


class SimulatedPolicy:
    """A deterministic, observation-reading policy for `swe-synth` tasks."""

    def __init__(self, success_rate: float, seed: int = 0) -> None:
        if not 0.0 <= success_rate <= 1.0:
            raise InvalidRequestError(f"success_rate must be in [0, 1], got {success_rate}")
        self.success_rate = success_rate
        self.seed = seed

    def draw(self, task_id: str) -> float:
        """The task's uniform draw in [0, 1): a pure function of (seed, task_id)."""
        value = int.from_bytes(_digest("solve", str(self.seed), task_id)[:8], "big")
        return value / 2**64

    def solves(self, task_id: str) -> bool:
        """Whether the policy fixes `task_id` (rather than applying the decoy)."""
        return self.draw(task_id) < self.success_rate

    def next_message(
        self, task_id: str, messages: Sequence[common_pb2.ChatMessage]
    ) -> common_pb2.ChatMessage:
        """The assistant's next message: some words and exactly one tool call."""
        history = _history(messages)
        turn = _Turn(task_id, len(history))
        statement = next((m.content for m in messages if m.role == "user"), "")
        parsed = parse_problem_statement(statement)
        if parsed is None:
            return turn.submit("I can't tell which file to fix, so I'll submit.")
        if turn.step >= MAX_ACTIONS:
            return turn.submit("I've run out of ideas; submitting.")
        function, path = parsed
        if not history:
            return turn.read(path)
        last = history[-1]
        reads = sum(1 for a in history if a.kind == "read")
        if last.kind == "read":
            return self._after_read(turn, last, function, path, history)
        if last.kind == "search":
            found = _first_py_path(last.observation or "")
            if found is not None and reads < 2:
                return turn.read(found)
            return turn.submit(f"I couldn't find `{function}`; submitting.")
        if last.kind == "edit":
            failed = (last.observation or "").lower().startswith("error")
            if failed and reads < 2:
                target = str(last.arguments.get("path", path))
                return turn.read(target, "The edit didn't apply. Let me re-read the file.")
            return turn.say(
                "Now let me run the visible tests.", tools.BASH, {"command": VISIBLE_TEST_COMMAND}
            )
        if last.kind == "test":
            if "[exit code" in (last.observation or ""):
                return turn.submit("Some tests still fail, but this is my best fix; submitting.")
            return turn.submit("The tests pass. Submitting.")
        return turn.submit("Submitting what I have.")

    def _after_read(
        self, turn: _Turn, last: _Action, function: str, path: str, history: list[_Action]
    ) -> common_pb2.ChatMessage:
        """Edit the buggy line if the file shows it; else search once; else submit."""
        observation = last.observation or ""
        site = locate_bug(observation, function)
        if site is not None:
            new = site.fixed if self.solves(turn.task_id) else site.decoy
            text = (
                f"The bug is in `{function}`: `{site.old.strip()}` is wrong. "
                f"I'll change it to `{new.strip()}`."
            )
            args = {"path": _cat_path(last) or path, "old": site.old, "new": new}
            return turn.say(text, tools.EDIT_FILE, args)
        searched = any(a.kind == "search" for a in history)
        if f"def {function}(" not in observation and not searched:
            command = f"grep -rn --include='*.py' {shlex.quote(f'def {function}(')} ."
            text = f"`{function}` isn't where I expected; let me search for it."
            return turn.say(text, tools.BASH, {"command": command})
        return turn.submit("I can't find the faulty line; submitting as is.")


@dataclass(frozen=True)
class _Turn:
    """Builds the assistant message of one step."""

    task_id: str
    step: int

    def say(
        self, text: str, tool: str, arguments: dict[str, Any] | None = None
    ) -> common_pb2.ChatMessage:
        call = common_pb2.ToolCall(
            id=f"call_{_digest('call', self.task_id).hex()[:12]}_{self.step}",
            name=tool,
            arguments_json=json.dumps(arguments or {}, sort_keys=True),
        )
        return common_pb2.ChatMessage(role="assistant", content=text, tool_calls=[call])

    def read(self, path: str, text: str = "") -> common_pb2.ChatMessage:
        command = f"cat {shlex.quote(path)}"
        return self.say(text or f"Let me look at `{path}`.", tools.BASH, {"command": command})

    def submit(self, text: str) -> common_pb2.ChatMessage:
        return self.say(text, tools.SUBMIT)


def _history(messages: Sequence[common_pb2.ChatMessage]) -> list[_Action]:
    """Every tool call so far with its observation, oldest first."""
    results = {m.tool_call_id: m.content for m in messages if m.role == "tool"}
    history: list[_Action] = []
    for message in messages:
        if message.role != "assistant":
            continue
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.arguments_json or "{}")
            except ValueError:
                arguments = {}
            if not isinstance(arguments, dict):
                arguments = {}
            history.append(
                _Action(_kind(call.name, arguments), call, arguments, results.get(call.id))
            )
    return history


def _kind(name: str, arguments: dict[str, Any]) -> str:
    if name == tools.EDIT_FILE:
        return "edit"
    if name == tools.SUBMIT:
        return "submit"
    command = str(arguments.get("command", "")) if name == tools.BASH else ""
    if command.startswith("cat "):
        return "read"
    if command.startswith("grep "):
        return "search"
    if "unittest" in command:
        return "test"
    return "other"


def _cat_path(action: _Action) -> str | None:
    """The file a `cat` action read."""
    try:
        words = split_words(str(action.arguments.get("command", "")))
    except ValueError:
        return None
    return words[1] if len(words) == 2 else None


def _first_py_path(output: str) -> str | None:
    for line in output.splitlines():
        match = _PY_PATH.match(line.strip())
        if match and not match.group(1).startswith("tests/"):
            return match.group(1)
    return None


def simulated_encode(text: str) -> list[int]:
    """The simulated tokenizer: each 4 bytes of UTF-8 are one token, its id their
    little-endian value (the last token zero-padded). Reversible, deterministic, cheap;
    it only stands in for a real tokenizer and says nothing about any real model."""
    data = text.encode()
    data += b"\0" * (-len(data) % 4)
    return memoryview(data).cast("I").tolist() if data else [0]


def simulated_decode(ids: list[int]) -> str:
    """The text `simulated_encode` made `ids` from."""
    data = array("I", ids).tobytes() if ids else b""
    return data.rstrip(b"\0").decode(errors="replace")


def simulated_logprobs(ids: list[int]) -> list[float]:
    """A deterministic pseudo log-probability in (-4, 0] per simulated token."""
    return [-((i * 2654435761) % 1000) / 250.0 for i in ids]


def count_tokens(text: str) -> int:
    """How many simulated tokens `text` is: one per 4 UTF-8 bytes, at least one."""
    return max(1, -(-len(text.encode()) // 4))


def _message_text(message: common_pb2.ChatMessage) -> str:
    parts = [message.content, *(c.name + c.arguments_json for c in message.tool_calls)]
    return "".join(parts)


class SimulatedBackend:
    """`ModelBackend`: the `SimulatedPolicy` answering behind a `GpuLatencyModel`."""

    kind = "simulated"

    def __init__(
        self,
        name: str = "simulated",
        version: str = "sim-1",
        success_rate: float = 0.8,
        seed: int = 0,
        latency: GpuLatencyModel | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.policy = SimulatedPolicy(success_rate, seed)
        self.latency = latency if latency is not None else GpuLatencyModel()

    @classmethod
    def fast(
        cls,
        name: str = "simulated",
        version: str = "sim-1",
        success_rate: float = 0.8,
        seed: int = 0,
        slots: int = 64,
    ) -> SimulatedBackend:
        """A backend that never sleeps (`time_scale=0`), for tests."""
        latency = GpuLatencyModel(LatencyConfig(slots=slots, time_scale=0.0))
        return cls(name, version, success_rate, seed, latency)

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        """The policy's next message, after queueing and service on the latency model."""
        if not request.messages:
            raise InvalidRequestError("generate needs at least one message")
        task_id = request.task_id or _anonymous_task_id(request.messages)
        try:
            message = self.policy.next_message(task_id, request.messages)
        except Exception as error:  # a policy bug must not pass for a task failure
            raise ModelUnavailableError(f"simulated policy failed: {error}") from error
        prompt_ids = simulated_encode("".join(_message_text(m) for m in request.messages))
        completion_ids = simulated_encode(_message_text(message))
        prompt_tokens, completion_tokens = len(prompt_ids), len(completion_ids)
        queue_s, service_s = await self.latency.run(
            prompt_tokens, completion_tokens, prefix_key=request.task_id or None
        )
        return model_pb2.GenerateResponse(
            message=message,
            model=self.name,
            model_version=self.version,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason="tool_calls",
            queue_s=queue_s,
            latency_s=queue_s + service_s,
            prompt_token_ids=prompt_ids,
            completion_token_ids=completion_ids,
            completion_logprobs=simulated_logprobs(completion_ids),
        )

    def stats(self) -> model_pb2.ModelStats:
        """Utilisation and load of the latency model."""
        return model_pb2.ModelStats(
            utilisation=self.latency.utilisation(),
            in_flight=self.latency.in_flight,
            queued=self.latency.queued,
            requests=self.latency.requests,
        )

    async def close(self) -> None:
        """Nothing to release."""


def build_simulated(spec: str, options: BackendOptions) -> SimulatedBackend:
    """The ``simulated`` entry of `megaflow.model.factory.MODEL_BACKENDS`."""
    if spec != "simulated":
        raise InvalidRequestError(f"model spec {spec!r}: 'simulated' takes no argument")
    return SimulatedBackend(
        name=options.name or "simulated",
        version=options.version or "sim-1",
        success_rate=options.success_rate,
        seed=options.seed,
        latency=GpuLatencyModel(options.latency or LatencyConfig()),
    )


def _anonymous_task_id(messages: Sequence[common_pb2.ChatMessage]) -> str:
    """A stable id for a request without one: a digest of its first user message."""
    first = next((m.content for m in messages if m.role == "user"), "")
    return "anon-" + _digest("task", first).hex()[:16]
