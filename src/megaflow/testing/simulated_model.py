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

The actions are abstract (read, search, edit, test, submit); how they are said
depends on the request, as a model follows its tools and instructions (`_Style`):
with the built-in tools (``bash``, ``edit_file``, ``submit``) as above; with other
tools, every action through the shell-like one (a function with a string ``command``
or ``cmd``: qwen-code's ``run_shell_command``, codex's ``shell``), an edit as a
``python3 -c`` command making the same replacement, submit through a submit-like
tool, else the submit command the prompt names, else a final plain answer (which
ends a CLI agent's session); with no tools and a prompt showing a fenced format
(mini-swe-agent's), a ``THOUGHT:`` and exactly one fenced command, submit being the
prompt's ``echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``. ``tool_choice`` ``none``,
``required`` and a named function are honoured. Observations are read back from
tool results, or from the user messages after a fenced command (text mode).

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

import codecs
import functools
import hashlib
import json
import re
import shlex
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
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

MAX_ACTIONS = 10  # past this many actions the policy always submits
_PY_PATH = re.compile(r"^\.?/?([\w./-]+\.py):")

# -- how a request lets the policy act (see `_style`) -----------------------------------
_BUILTINS = frozenset({tools.BASH, tools.EDIT_FILE, tools.SUBMIT})
_SHELL_PARAMS = ("command", "cmd")  # a function tool with one of these is shell-like
_SUBMIT_TOOL = re.compile(r"^(submit|finish)", re.IGNORECASE)
# A fenced block's language in the instructions: text mode answers in that fence.
_FENCE = re.compile(r"```([A-Za-z_][\w-]*)[ \t]*\n")
_BLOCK = re.compile(r"```[\w-]*[ \t]*\n(.*?)\n```", re.DOTALL)
# The submit command the instructions name, in backticks or opening a line of a block,
# e.g. mini-swe-agent's `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` (v1:
# `echo MINI_SWE_AGENT_FINAL_OUTPUT`; its swebench.yaml adds `&& cat patch.txt`).
_SUBMIT_COMMAND = re.compile(
    r"(?:`|^[ \t]*)(echo[ \t]+[A-Z][A-Z0-9_]*(?:SUBMIT|FINAL_OUTPUT)[A-Z0-9_]*)\b", re.M
)
_IS_SUBMIT_COMMAND = re.compile(r"^echo\s+[A-Z][A-Z0-9_]*(?:SUBMIT|FINAL_OUTPUT)[A-Z0-9_]*$")
# A failed command, as the built-in agent, mini-swe-agent and unittest report it.
_FAILED = re.compile(r"\[exit code [1-9]|<returncode>\s*-?[1-9]|FAILED \(|exit code:\s*[1-9]", re.I)
# `edit_file` as one shell command: exactly one occurrence of old -> new (python3 is in
# every sandbox); path, old and new are its arguments, so nothing needs escaping twice.
EDIT_SCRIPT = (
    "import sys, pathlib; p, old, new = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]; "
    "t = p.read_text(); n = t.count(old); "
    'sys.exit(f"error: old text occurs {n} times in {p}") if n != 1 else None; '
    'p.write_text(t.replace(old, new, 1)); print(f"edited {p}")'
)


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode()).digest()


# json.dumps(..., sort_keys=True) builds an encoder per call; this one is built once and
# writes the very same text.
_dumps_sorted = json.JSONEncoder(sort_keys=True).encode


@functools.lru_cache(maxsize=16_384)
def _call_prefix(task_id: str) -> str:
    """The task's tool-call id prefix (a digest of its id: computed once per task)."""
    return f"call_{_digest('call', task_id).hex()[:12]}_"


# The problem statement is the same message every turn of a task: parse it once. (The
# cache keeps its text: bounded, so that thousands of tasks in flight hold little.)
_parse_statement = functools.lru_cache(maxsize=4096)(parse_problem_statement)


def edit_command(path: str, old: str, new: str) -> str:
    """The shell command that does what `edit_file(path, old, new)` does."""
    return shlex.join(["python3", "-c", EDIT_SCRIPT, path, old, new])


@dataclass(frozen=True)
class _Action:
    kind: str  # read | search | edit | test | submit | other
    arguments: dict[str, Any]  # {"command": ...}, or edit_file's {"path", "old", "new"}
    observation: str | None


@dataclass(frozen=True)
class _Style:
    """How the policy expresses its actions for one request.

    builtin  the built-in tools (`bash`, `edit_file`, `submit`): every tool is offered,
             or no tool is and the prompt asks for no text format (as before tools mattered)
    shell    every action through one shell-like tool; submit through a submit-like
             tool, else the submit command the prompt names, else a final plain answer
    text     no tools: a THOUGHT and exactly one fenced block (mini-swe-agent's format),
             in the fence language the prompt shows; submit = the prompt's submit command
    """

    mode: str
    shell: str = ""  # the shell-like tool
    param: str = "command"  # its command parameter
    array: bool = False  # the parameter is argv (codex's `shell`): ["bash", "-lc", cmd]
    defaults: tuple[tuple[str, Any], ...] = ()  # its other required parameters
    submit_tool: str = ""
    submit_defaults: tuple[tuple[str, Any], ...] = ()
    submit_command: str = ""
    fence: str = "bash"
    must_call: bool = False  # tool_choice "required" (or a named function)


def _schema(parameters_json_schema: str) -> dict[str, Any]:
    try:
        schema = json.loads(parameters_json_schema or "{}")
    except ValueError:
        return {}
    return schema if isinstance(schema, dict) else {}


_FILLER: dict[str, Any] = {"boolean": False, "integer": 0, "number": 0, "array": [], "object": {}}


def _defaults(schema: dict[str, Any], skip: str = "") -> tuple[tuple[str, Any], ...]:
    """A plain value for each required parameter but `skip` (false, 0, "", [], {})."""
    properties = schema.get("properties") or {}
    required = [r for r in schema.get("required") or [] if isinstance(r, str) and r != skip]
    kinds = {r: (properties.get(r) or {}).get("type", "string") for r in required}
    return tuple((r, _FILLER.get(str(kinds[r]), "")) for r in required)


def _style(
    messages: Sequence[common_pb2.ChatMessage],
    offered: Sequence[common_pb2.ToolSpec],
    tool_choice: str,
) -> _Style:
    """Read the request the way a model does: which tools, which choice, what format."""
    instructions = []
    for message in messages:
        role = message.role
        if role == "assistant":
            break
        if role in ("system", "user", "developer"):
            instructions.append(message.content)
    # An agent sends the same instructions and tools every turn: the style is a pure
    # function of them, read once (the prompt's regexes, the tools' JSON schemas).
    specs = tuple((t.name, t.parameters_json_schema) for t in offered)
    return _style_of("\n".join(instructions), specs, tool_choice)


@functools.lru_cache(maxsize=4096)
def _style_of(prompt: str, specs: tuple[tuple[str, str], ...], tool_choice: str) -> _Style:
    """`_style` of the instructions `prompt` and the offered tools' (name, schema)."""
    fence = _FENCE.search(prompt)
    if not specs and fence is None and tool_choice in ("", "auto"):
        return _Style("builtin")  # a bare request: the built-in tools, as always
    found = _SUBMIT_COMMAND.search(prompt)
    submit_command = found.group(1) if found else ""
    must_call = tool_choice == "required"
    offered = specs
    if tool_choice == "none":
        offered = ()
    elif tool_choice not in ("", "auto", "required"):  # one named function
        offered = tuple(t for t in offered if t[0] == tool_choice)
        must_call = True
    names = {name for name, _ in offered}
    if _BUILTINS <= names:
        return _Style("builtin")
    if not offered:
        return _Style("text", submit_command=submit_command, fence=_fence(fence))
    style = _Style("shell", submit_command=submit_command, must_call=must_call)
    for name, parameters in offered:
        schema = _schema(parameters)
        properties = schema.get("properties") or {}
        if not style.submit_tool and _SUBMIT_TOOL.match(name):
            style = replace(style, submit_tool=name, submit_defaults=_defaults(schema))
            continue
        for param in _SHELL_PARAMS:
            kind = (properties.get(param) or {}).get("type") if param in properties else None
            if not style.shell and kind in ("string", "array"):
                style = replace(
                    style,
                    shell=name,
                    param=param,
                    array=kind == "array",
                    defaults=_defaults(schema, skip=param),
                )
    return style


def _fence(match: re.Match[str] | None) -> str:
    return match.group(1) if match else "bash"


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
        self,
        task_id: str,
        messages: Sequence[common_pb2.ChatMessage],
        tools: Sequence[common_pb2.ToolSpec] = (),
        tool_choice: str = "",
    ) -> common_pb2.ChatMessage:
        """The assistant's next message: some words and one action, expressed with the
        tools the request offers and its `tool_choice` (see `_Style`)."""
        history = _history(messages)
        turn = _Turn(task_id, len(history), _style(messages, tools, tool_choice))
        parsed = next(
            (
                statement
                for m in messages
                if m.role == "user" and (statement := _parse_statement(m.content))
            ),
            None,
        )
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
            observation = last.observation or ""
            failed = (
                observation.lower().lstrip().startswith("error") or "edited " not in observation
            )
            if failed and reads < 2:
                target = str(last.arguments.get("path", path))
                return turn.read(target, "The edit didn't apply. Let me re-read the file.")
            return turn.run("Now let me run the visible tests.", VISIBLE_TEST_COMMAND)
        if last.kind == "test":
            if _FAILED.search(last.observation or ""):
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
            return turn.edit(text, _cat_path(last) or path, site.old, new)
        searched = any(a.kind == "search" for a in history)
        if f"def {function}(" not in observation and not searched:
            command = f"grep -rn --include='*.py' {shlex.quote(f'def {function}(')} ."
            return turn.run(f"`{function}` isn't where I expected; let me search for it.", command)
        return turn.submit("I can't find the faulty line; submitting as is.")


@dataclass(frozen=True)
class _Turn:
    """Builds the assistant message of one step, in the request's `_Style`."""

    task_id: str
    step: int
    style: _Style = _Style("builtin")

    def call(
        self, text: str, tool: str, arguments: dict[str, Any] | None = None
    ) -> common_pb2.ChatMessage:
        call = common_pb2.ToolCall(
            id=f"{_call_prefix(self.task_id)}{self.step}",
            name=tool,
            arguments_json=_dumps_sorted(arguments or {}),
        )
        return common_pb2.ChatMessage(role="assistant", content=text, tool_calls=[call])

    def run(self, text: str, command: str) -> common_pb2.ChatMessage:
        """One shell command: the `bash` tool, the shell-like tool, or a fenced block."""
        style = self.style
        if style.mode == "builtin":
            return self.call(text, tools.BASH, {"command": command})
        if style.mode == "text":
            content = f"THOUGHT: {text}\n\n```{style.fence}\n{command}\n```"
            return common_pb2.ChatMessage(role="assistant", content=content)
        if not style.shell:  # nothing to run it with
            return self.submit(text)
        value: Any = ["bash", "-lc", command] if style.array else command
        return self.call(text, style.shell, {**dict(style.defaults), style.param: value})

    def read(self, path: str, text: str = "") -> common_pb2.ChatMessage:
        return self.run(text or f"Let me look at `{path}`.", f"cat {shlex.quote(path)}")

    def edit(self, text: str, path: str, old: str, new: str) -> common_pb2.ChatMessage:
        if self.style.mode == "builtin":
            return self.call(text, tools.EDIT_FILE, {"path": path, "old": old, "new": new})
        return self.run(text, edit_command(path, old, new))

    def submit(self, text: str) -> common_pb2.ChatMessage:
        style = self.style
        if style.mode == "builtin":
            return self.call(text, tools.SUBMIT)
        if style.submit_tool:
            return self.call(text, style.submit_tool, dict(style.submit_defaults))
        if style.submit_command and (style.shell or style.mode == "text"):
            return self.run(text, style.submit_command)
        if style.must_call and style.shell:  # a tool call is required: say it with one
            return self.run(text, f"echo {shlex.quote(text)}")
        return common_pb2.ChatMessage(role="assistant", content=text)  # the final answer


def _history(messages: Sequence[common_pb2.ChatMessage]) -> list[_Action]:
    """Every action so far with its observation, oldest first: tool calls with their
    tool results, and fenced commands (text mode) with the user messages that follow."""
    results = {m.tool_call_id: m.content for m in messages if m.role == "tool"}
    history: list[_Action] = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        for call in message.tool_calls:
            history.append(_call_action(call, results.get(call.id)))
        if message.tool_calls:
            continue
        block = _BLOCK.search(message.content)
        if block is None:
            continue
        replies = []
        for later in messages[i + 1 :]:
            if later.role == "assistant":
                break
            if later.role in ("user", "tool"):
                replies.append(later.content)
        kind, arguments = _classify(block.group(1))
        history.append(_Action(kind, arguments, "\n".join(replies) if replies else None))
    return history


def _call_action(call: common_pb2.ToolCall, observation: str | None) -> _Action:
    try:
        arguments = json.loads(call.arguments_json or "{}")
    except ValueError:
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    if call.name == tools.EDIT_FILE:
        return _Action("edit", arguments, observation)
    if call.name == tools.SUBMIT or _SUBMIT_TOOL.match(call.name):
        return _Action("submit", arguments, observation)
    command = next((arguments[p] for p in _SHELL_PARAMS if p in arguments), None)
    if isinstance(command, list) and command and all(isinstance(w, str) for w in command):
        command = command[-1] if command[:1] in (["bash"], ["sh"]) else shlex.join(command)
    if not isinstance(command, str):
        return _Action("other", arguments, observation)
    kind, parsed = _classify(command)
    return _Action(kind, parsed, observation)


def _classify(command: str) -> tuple[str, dict[str, Any]]:
    """What a shell command does, in the policy's terms, and its arguments."""
    command = command.strip()
    if command.startswith("python3 -c "):
        try:
            words = split_words(command)
        except ValueError:
            words = []
        if len(words) == 6 and words[2] == EDIT_SCRIPT:
            return "edit", {"path": words[3], "old": words[4], "new": words[5]}
    if _IS_SUBMIT_COMMAND.match(command):
        return "submit", {"command": command}
    arguments = {"command": command}
    if command.startswith("cat "):
        return "read", arguments
    if command.startswith("grep "):
        return "search", arguments
    if "unittest" in command:
        return "test", arguments
    return "other", arguments


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


# (i * 2654435761) % 1000 depends on i % 1000 only: one table, no 64-bit products.
_LOGPROBS = tuple(-((r * 2654435761) % 1000) / 250.0 for r in range(1000))


def simulated_logprobs(ids: list[int]) -> list[float]:
    """A deterministic pseudo log-probability in (-4, 0] per simulated token:
    -((id * 2654435761) % 1000) / 250."""
    table = _LOGPROBS
    return [table[i % 1000] for i in ids]


def count_tokens(text: str) -> int:
    """How many simulated tokens `text` is: one per 4 UTF-8 bytes, at least one."""
    return max(1, -(-len(text.encode()) // 4))


def _message_text(message: common_pb2.ChatMessage) -> str:
    parts = [message.content, *(c.name + c.arguments_json for c in message.tool_calls)]
    return "".join(parts)


def _prompt_text(messages: Sequence[common_pb2.ChatMessage]) -> str:
    """The whole conversation's text, as `_message_text` of each message joined."""
    parts = []
    for message in messages:
        parts.append(message.content)
        calls = message.tool_calls
        if calls:
            for call in calls:
                parts.append(call.name)
                parts.append(call.arguments_json)
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

    def _answer(
        self, request: model_pb2.GenerateRequest
    ) -> tuple[common_pb2.ChatMessage, list[int], list[int]]:
        """The policy's next message, the prompt's and the message's token ids."""
        if not request.messages:
            raise InvalidRequestError("generate needs at least one message")
        task_id = request.task_id or _anonymous_task_id(request.messages)
        try:
            message = self.policy.next_message(
                task_id, request.messages, request.tools, request.tool_choice
            )
        except Exception as error:  # a policy bug must not pass for a task failure
            raise ModelUnavailableError(f"simulated policy failed: {error}") from error
        prompt_ids = simulated_encode(_prompt_text(request.messages))
        return message, prompt_ids, simulated_encode(_message_text(message))

    def _response(
        self,
        message: common_pb2.ChatMessage,
        prompt_ids: list[int],
        completion_ids: list[int],
        queue_s: float,
        service_s: float,
    ) -> model_pb2.GenerateResponse:
        return model_pb2.GenerateResponse(
            message=message,
            model=self.name,
            model_version=self.version,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(completion_ids),
            finish_reason="tool_calls" if message.tool_calls else "stop",
            queue_s=queue_s,
            latency_s=queue_s + service_s,
            prompt_token_ids=prompt_ids,
            completion_token_ids=completion_ids,
            completion_logprobs=simulated_logprobs(completion_ids),
        )

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        """The policy's next message, after queueing and service on the latency model."""
        message, prompt_ids, completion_ids = self._answer(request)
        queue_s, service_s = await self.latency.run(
            len(prompt_ids), len(completion_ids), prefix_key=request.task_id or None
        )
        return self._response(message, prompt_ids, completion_ids, queue_s, service_s)

    async def generate_stream(
        self, request: model_pb2.GenerateRequest
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        """`generate`, streamed: the answer's tokens as the latency model produces them
        (after the prefill, one per decode step). The content's text goes out with the
        tokens that spell it (4 UTF-8 bytes per simulated token, cut at whole
        characters); the tokens of tool calls come without text, and the tool calls
        themselves in the last chunk's `final`, as `generate` returns them."""
        message, prompt_ids, completion_ids = self._answer(request)
        logprobs = simulated_logprobs(completion_ids)
        content = message.content.encode()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        arrived = time.monotonic()
        queue_s = 0.0
        sent = 0  # tokens handed out
        spelt = 0  # content bytes handed out
        produced = self.latency.stream(
            len(prompt_ids), len(completion_ids), prefix_key=request.task_id or None
        )
        try:
            async for done in produced:
                if done == 0:
                    queue_s = time.monotonic() - arrived
                    continue
                upto = min(4 * done, len(content))
                text = ""
                if upto > spelt:
                    text = decoder.decode(content[spelt:upto], final=upto == len(content))
                    spelt = upto
                yield model_pb2.GenerateChunk(
                    text=text, token_ids=completion_ids[sent:done], logprobs=logprobs[sent:done]
                )
                sent = done
        finally:
            await produced.aclose()
        ended = time.monotonic()
        final = self._response(
            message, prompt_ids, completion_ids, queue_s, ended - arrived - queue_s
        )
        yield model_pb2.GenerateChunk(final=final)

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
