"""mini-swe-agent (PyPI ``mini-swe-agent``, pinned, unmodified) as a MegaFlow scaffold.

    TaskSpec.scaffold.type = "mini-swe-agent"
    TaskSpec.scaffold.config_json = '{"config": ["mini_textbased.yaml"],
        "model": {"model_class": "litellm_textbased"}, "agent": {"step_limit": 30}}'

mini-swe-agent's own agent class (``DefaultAgent``, or the ``agent.agent_class`` the config
names, through its ``get_agent``) runs with two adapters in place of its litellm model and
its local/docker environment (design.md §9: in-process adapters call the session):

- `SessionModel.query(messages)` sends what is new in mini-swe-agent's conversation to
  `TaskSession.generate`, so every turn is recorded like the built-in agent's (token ids,
  logprobs, model version). The session's conversation only grows: a reply that had a
  format error stays in it (mini-swe-agent drops it from its own list and adds its
  format-error message), and an agent class that rewrites earlier messages is refused
  (a scaffold error: ``invalid``). The answer is parsed by mini-swe-agent's own functions: its
  ``bash`` tool call (``parse_toolcall_actions``; the default, as ``LitellmModel``) or, for
  a text-based model class (``model_class`` naming ``*textbased*``, or an ``action_regex``),
  one fenced block (``parse_regex_actions``, as ``LitellmTextbasedModel``). Observations are
  formatted by its own templates and functions too.
- `SessionEnvironment.execute(action)` runs the command in the task's sandbox through
  `TaskSession.execute` (the step API), in a subshell ``( ... )`` as mini-swe-agent's
  environments run each action in a new one (``cd`` and variables do not persist), with
  the config's ``env`` exported and its ``cwd``; the output's first line
  ``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`` ends the run as in its ``LocalEnvironment``.

Its config passes through (`MiniSweAgentConfig`): ``config`` is a list of mini-swe-agent
config specs, merged the way its ``mini -c`` merges them (a file of its config folder such
as ``default.yaml`` or ``mini_textbased.yaml``, a path, or ``key.path=value``); then the
``agent``, ``model`` and ``environment`` sections are merged on top. The agent section is
validated by mini-swe-agent's ``AgentConfig`` when the task is accepted, so a bad field is
an ``invalid`` result naming it. Prompts and templates, ``step_limit``, ``cost_limit``,
``wall_time_limit_seconds`` and the observation/format-error templates work as in
mini-swe-agent; its litellm settings (``model_name``, ``model_kwargs``, ...) are ignored:
the task's model answers. Cost is ``prompt_tokens * input_cost_per_token +
completion_tokens * output_cost_per_token`` (both 0 by default, so ``cost_limit`` only
bites when they are set). The session's own budgets (steps, tokens, the task deadline)
still apply and end the task as for any scaffold.

When mini-swe-agent's run returns (submitted, its step or cost limit, repeated format
errors), the scaffold calls `TaskSession.submit`: the hidden tests give the reward, as
mini-swe-agent's SWE-bench runner evaluates whatever the agent left.

Threads: mini-swe-agent's loop is synchronous, so it runs in a thread of its own (one per
task: a shared pool would cap the tasks running at once); each model call and command is
sent to the event loop with ``asyncio.run_coroutine_threadsafe`` and waited for with a
timeout (the task's deadline). When the task is cancelled (its deadline, a stale attempt,
shutdown), the call in flight is cancelled and every later call raises `_Stopped`, so the
thread's loop ends at its next step; the scaffold does not wait for the thread. An
exception of the session (an infrastructure error, `TaskOutcome` for a budget) passes
through mini-swe-agent's loop, which re-raises it, and is classified by the session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import platform
import shlex
import threading
import time
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import common_pb2

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")  # no banner on import

from minisweagent.agents import get_agent
from minisweagent.agents.default import AgentConfig
from minisweagent.config import get_config_from_spec
from minisweagent.environments.local import LocalEnvironment
from minisweagent.exceptions import FormatError
from minisweagent.models.utils.actions_text import (
    format_observation_messages,
    parse_regex_actions,
)
from minisweagent.models.utils.actions_toolcall import (
    BASH_TOOL,
    format_toolcall_observation_messages,
    parse_toolcall_actions,
)
from minisweagent.utils.serialize import recursive_merge

if TYPE_CHECKING:
    from megaflow.agent.session import TaskSession

T = TypeVar("T")

DEFAULT_CONFIG = "default.yaml"
DEFAULT_AGENT = "minisweagent.agents.default.DefaultAgent"
"""mini-swe-agent's own default config file (of its `DefaultAgent`)."""
TEXT_ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"
"""`LitellmTextbasedModelConfig.action_regex` of mini-swe-agent 2.4.6 (copied: importing
that module imports litellm, seconds of start-up for nothing)."""
TEXT_FORMAT_ERROR = (
    "Please always provide EXACTLY ONE action in triple backticks, "
    "found {{actions|length}} actions."
)
"""`LitellmTextbasedModelConfig.format_error_template` of mini-swe-agent 2.4.6."""
CALL_MARGIN_S = 30.0
"""How much longer than the task's deadline a bridged call may take before it is abandoned."""


class MiniModelConfig(BaseModel):
    """The ``model`` section: what mini-swe-agent's model classes read besides litellm's
    settings (``model_name``, ``model_kwargs``, ... are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model_class: str = ""
    action_regex: str | None = None
    observation_template: str = (
        "{% if output.exception_info %}<exception>{{output.exception_info}}</exception>\n"
        "{% endif %}<returncode>{{output.returncode}}</returncode>\n<output>\n"
        "{{output.output}}</output>"
    )
    format_error_template: str | None = None
    multimodal_regex: str = ""
    input_cost_per_token: float = Field(default=0.0, ge=0.0)
    output_cost_per_token: float = Field(default=0.0, ge=0.0)

    @property
    def text_based(self) -> bool:
        """Actions in fenced blocks (a ``*textbased*`` class or an ``action_regex``)."""
        return "textbased" in self.model_class.lower() or self.action_regex is not None


class MiniEnvironmentConfig(BaseModel):
    """The ``environment`` section (``LocalEnvironmentConfig``'s fields; a docker image and
    the like are ignored: the task's sandbox is the environment)."""

    model_config = ConfigDict(extra="ignore")

    cwd: str = ""
    env: dict[str, str] = {}
    timeout: int = Field(default=30, gt=0)


class MiniSweAgentConfig(BaseModel):
    """The scaffold's config: mini-swe-agent's own, passed through (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: list[str] = Field(
        default=[DEFAULT_CONFIG],
        description="mini-swe-agent config specs merged in order, as `mini -c`: a file name "
        "of its config folder, a path, or key.path=value.",
    )
    agent: dict[str, Any] = Field(default={}, description="Merged into the agent section.")
    model: dict[str, Any] = Field(default={}, description="Merged into the model section.")
    environment: dict[str, Any] = Field(default={}, description="Merged into the environment.")
    _merged: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def merged(self) -> dict[str, Any]:
        """The whole mini-swe-agent config: the specs merged, then the sections."""
        return self._merged

    @model_validator(mode="after")
    def _merge(self) -> MiniSweAgentConfig:
        loaded = [_load_spec(spec) for spec in self.config]
        sections = {"agent": self.agent, "model": self.model, "environment": self.environment}
        merged = recursive_merge(*loaded, sections)
        for name in ("agent", "model", "environment"):
            if not isinstance(merged.get(name) or {}, dict):
                raise ValueError(f"{name}: mini-swe-agent's {name} section must be a mapping")
        agent = dict(merged.get("agent") or {})
        if agent.get("agent_class", "default") in ("default", DEFAULT_AGENT):
            fields = {k: v for k, v in agent.items() if k != "agent_class"}
            _validated(AgentConfig, fields, "agent")
        _validated(MiniModelConfig, merged.get("model") or {}, "model")
        _validated(MiniEnvironmentConfig, merged.get("environment") or {}, "environment")
        self._merged = merged
        return self


def _load_spec(spec: str) -> dict[str, Any]:
    """One mini-swe-agent config spec (its `get_config_from_spec`), or a ValueError."""
    try:
        loaded = get_config_from_spec(spec)
    except Exception as error:  # a missing file, bad YAML, a bad key=value
        raise ValueError(f"mini-swe-agent config {spec!r}: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"mini-swe-agent config {spec!r} is not a mapping of sections")
    return loaded


def _validated(cls: type[BaseModel], data: dict[str, Any], section: str) -> BaseModel:
    """`cls` from `data`; a ValueError naming each bad field as ``section.field``."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join([section, *map(str, e['loc'])])}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(problems) from None


class _Stopped(Exception):
    """The task was cancelled: mini-swe-agent's loop must end (raised in its thread)."""


class _Bridge:
    """Runs coroutines on the task's event loop from mini-swe-agent's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: concurrent.futures.Future[Any] | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """The coroutine's result (or exception), run on the loop; `_Stopped` once stopped."""
        with self._lock:
            if self.stopped.is_set():
                coro.close()
                raise _Stopped("the task was cancelled")
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._in_flight = future
        try:
            return future.result(self.timeout_s)
        except concurrent.futures.CancelledError:
            raise _Stopped("the task was cancelled") from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from the session in {self.timeout_s:.0f}s") from None
        finally:
            with self._lock:
                self._in_flight = None

    def post(self, callback: Any, *args: Any) -> None:
        """Run `callback(*args)` on the loop, in order with the calls (fire and forget)."""
        if not self.stopped.is_set():
            self.loop.call_soon_threadsafe(callback, *args)

    def stop(self) -> None:
        """From the loop: cancel the call in flight; every later call raises `_Stopped`."""
        with self._lock:
            self.stopped.set()
            if self._in_flight is not None:
                self._in_flight.cancel()


def _text(content: Any) -> str:
    """A mini-swe-agent message's content as text (multimodal parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _to_proto(message: dict[str, Any]) -> common_pb2.ChatMessage:
    proto = common_pb2.ChatMessage(
        role=str(message.get("role", "user")),
        content=_text(message.get("content")),
        tool_call_id=str(message.get("tool_call_id") or ""),
    )
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        proto.tool_calls.add(
            id=str(call.get("id", "")),
            name=str(function.get("name", "")),
            arguments_json=str(function.get("arguments", "")),
        )
    return proto


class SessionModel:
    """mini-swe-agent's `Model` protocol, answered by `TaskSession.generate`."""

    def __init__(self, session: TaskSession, bridge: _Bridge, config: MiniModelConfig) -> None:
        self.session = session
        self.bridge = bridge
        self.config = config
        self._seen: list[dict[str, Any]] = []  # its messages already sent to the session
        self._last: dict[str, Any] | None = None  # our last answer (the session has it)
        self._calls = 0

    def query(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        seen = self._seen
        if len(messages) < len(seen) or any(
            a is not b for a, b in zip(seen, messages[: len(seen)], strict=True)
        ):
            # The session's conversation only grows (what the model saw is what is recorded).
            raise RuntimeError("mini-swe-agent's agent rewrote its earlier messages")
        new = [m for m in messages[len(seen) :] if m is not self._last]
        self._seen = list(messages)
        index = self._calls
        self._calls += 1
        reply, usage = self.bridge.call(self._generate([_to_proto(m) for m in new], index))
        prompt_tokens, completion_tokens, model_version = usage
        cost = (
            prompt_tokens * self.config.input_cost_per_token
            + completion_tokens * self.config.output_cost_per_token
        )
        extra: dict[str, Any] = {
            "cost": cost,
            "model_version": model_version,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "timestamp": time.time(),
        }
        finish_reason = "tool_calls" if reply.tool_calls else "stop"
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "extra": extra}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json},
                }
                for c in reply.tool_calls
            ]
        try:
            extra["actions"] = self._parse(reply, finish_reason)
        except FormatError as error:  # as mini-swe-agent's models: keep the cost
            error.messages[0].setdefault("extra", {}).update(
                cost=cost, model_response=reply.content
            )
            self._last = None
            raise
        self._last = message
        return message

    async def _generate(
        self, new: list[common_pb2.ChatMessage], index: int
    ) -> tuple[common_pb2.ChatMessage, tuple[int, int, str]]:
        reply = await self.session.generate(new)
        turns = self.session.trajectory.turns
        turn = turns[index] if index < len(turns) else turns[-1]
        return reply, (turn.prompt_tokens, turn.completion_tokens, turn.model_version)

    def _parse(self, reply: common_pb2.ChatMessage, finish_reason: str) -> list[dict[str, Any]]:
        config = self.config
        if config.text_based:
            return parse_regex_actions(
                reply.content,
                action_regex=config.action_regex or TEXT_ACTION_REGEX,
                format_error_template=config.format_error_template or TEXT_FORMAT_ERROR,
                template_kwargs={"finish_reason": finish_reason},
            )
        calls = [
            SimpleNamespace(
                id=c.id, function=SimpleNamespace(name=c.name, arguments=c.arguments_json)
            )
            for c in reply.tool_calls
        ]
        return parse_toolcall_actions(
            calls,
            format_error_template=config.format_error_template or "{{ error }}",
            template_kwargs={"finish_reason": finish_reason},
        )

    def format_message(self, **kwargs: Any) -> dict[str, Any]:
        return dict(kwargs)

    def format_observation_messages(
        self,
        message: dict[str, Any],
        outputs: list[dict[str, Any]],
        template_vars: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        config = self.config
        if config.text_based:
            observations = format_observation_messages(
                outputs,
                observation_template=config.observation_template,
                template_vars=template_vars,
                multimodal_regex=config.multimodal_regex,
            )
        else:
            observations = format_toolcall_observation_messages(
                actions=message.get("extra", {}).get("actions", []),
                outputs=outputs,
                observation_template=config.observation_template,
                template_vars=template_vars,
                multimodal_regex=config.multimodal_regex,
            )
        for observation in observations:
            self.bridge.post(self.session.observe, _to_proto(observation))
        return observations

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return self.config.model_dump() | kwargs

    def serialize(self) -> dict[str, Any]:
        model = {"model": self.config.model_dump(mode="json"), "model_type": "megaflow.session"}
        return {"info": {"config": model}}


class SessionEnvironment:
    """mini-swe-agent's `Environment` protocol: commands in the task's sandbox through
    `TaskSession.execute`."""

    def __init__(
        self, session: TaskSession, bridge: _Bridge, config: MiniEnvironmentConfig
    ) -> None:
        self.session = session
        self.bridge = bridge
        self.config = config

    def execute(
        self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None
    ) -> dict[str, Any]:
        command = str(action.get("command", ""))
        timeout_s = float(min(timeout or self.config.timeout, self.session.step_timeout_s))
        output: dict[str, Any]
        try:
            step = self.bridge.call(self.session.execute(self._wrap(command, cwd), timeout_s))
        except InvalidRequestError as error:  # a command the sandbox refuses (too long, NUL)
            output = {
                "output": "",
                "returncode": -1,
                "exception_info": f"An error occurred while executing the command: {error}",
                "extra": {"exception_type": type(error).__name__, "exception": str(error)},
            }
        else:
            output = {"output": step.output, "returncode": step.exit_code, "exception_info": ""}
            if step.timed_out:
                output["returncode"] = -1
                output["exception_info"] = (
                    f"An error occurred while executing the command: Command timed out after "
                    f"{timeout_s:g} seconds"
                )
        # mini-swe-agent's own test for "submitted" (raises its `Submitted`).
        LocalEnvironment._check_finished(self, output)  # type: ignore[arg-type]
        return output

    def _wrap(self, command: str, cwd: str) -> str:
        """`command` in a subshell (a fresh one per action, as mini-swe-agent's
        environments), with the configured variables and working directory."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.config.env.items()]
        if cwd or self.config.cwd:
            lines.append(f"cd {shlex.quote(cwd or self.config.cwd)} || exit")
        lines.append(command)
        return "(\n" + "\n".join(lines) + "\n)"

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return recursive_merge(self.config.model_dump(), platform.uname()._asdict(), kwargs)

    def serialize(self) -> dict[str, Any]:
        environment = self.config.model_dump(mode="json")
        return {
            "info": {"config": {"environment": environment, "environment_type": "megaflow.session"}}
        }


class MiniSweAgentScaffold:
    """mini-swe-agent's agent, unmodified, in a thread; model and commands through the
    session (see the module doc)."""

    Config = MiniSweAgentConfig

    def __init__(self, config: MiniSweAgentConfig | None = None) -> None:
        self.config = config or MiniSweAgentConfig()
        self.info: dict[str, Any] = {}  # what mini-swe-agent's run returned

    async def run(self, session: TaskSession) -> None:
        merged = self.config.merged
        model_config = MiniModelConfig.model_validate(merged.get("model") or {})
        env_config = MiniEnvironmentConfig.model_validate(merged.get("environment") or {})
        loop = asyncio.get_running_loop()
        bridge = _Bridge(loop, session.task_timeout_s + CALL_MARGIN_S)
        if model_config.text_based:
            session.set_tools([])
        else:
            function: dict[str, Any] = dict(BASH_TOOL["function"])  # type: ignore[arg-type]
            schema = json.dumps(function["parameters"])
            name, description = function["name"], function["description"]
            bash = common_pb2.ToolSpec(
                name=name, description=description, parameters_json_schema=schema
            )
            session.set_tools([bash])
        model = SessionModel(session, bridge, model_config)
        env = SessionEnvironment(session, bridge, env_config)
        agent = get_agent(model, env, dict(merged.get("agent") or {}), default_type="default")
        done: asyncio.Future[dict[str, Any]] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result if isinstance(result, dict) else {})

        def main() -> None:
            try:
                result, error = agent.run(session.task.problem_statement), None
            except BaseException as exc:  # handed to the loop, raised there
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        thread = threading.Thread(
            target=main, name=f"mini-swe-agent:{session.task_id}", daemon=True
        )
        thread.start()
        try:
            self.info = await done
        except BaseException:
            bridge.stop()  # cancelled, or mini-swe-agent raised: its thread ends now
            raise
        await session.submit()
