"""mini-swe-agent (PyPI ``mini-swe-agent``, pinned, unmodified) as a MegaFlow scaffold.

    TaskSpec.scaffold.type = "mini-swe-agent"
    TaskSpec.scaffold.config_json = '{"config": ["mini_textbased.yaml"],
        "model": {"model_class": "litellm_textbased"}, "agent": {"step_limit": 30}}'

mini-swe-agent's own agent class (``DefaultAgent``, or the ``agent.agent_class`` the config
names, through its ``get_agent``) runs with its own model class and one adapter, for its
environment:

- **Model: its own litellm class, through MegaFlow's gateway.** The model is made by its
  ``get_model`` from the config's model section: its ``LitellmModel`` (``bash`` tool calls,
  the default) or ``LitellmTextbasedModel`` (one fenced block per answer), or a subclass
  of them. Its ``model_name`` has the ``openai/`` provider and its ``model_kwargs`` carry
  ``api_base``/``api_key`` of the task's own OpenAI endpoint (`TaskModelEndpoint` with
  ``listen="tcp"``: MegaFlow's gateway on a loopback port, with a random key that ties
  every call to the task). So each of its model calls is an HTTP request from litellm
  to the gateway, answered by `TaskSession.generate`: every turn is recorded like the
  built-in agent's (token ids, logprobs, model version, replica) and counts against the
  task's budgets. A model class that calls another service (openrouter, portkey,
  requesty, its Responses-API class) is refused when the task is accepted.
- **Environment:** `SessionEnvironment.execute(action)` runs the command in the task's
  sandbox through `TaskSession.execute` (the step API), in a subshell ``( ... )`` as
  mini-swe-agent's environments run each action in a new one (``cd`` and variables do
  not persist), with the config's ``env`` exported and its ``cwd``; the output's first
  line ``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`` ends the run as in its
  ``LocalEnvironment``.

Its config passes through (`MiniSweAgentConfig`): ``config`` is a list of mini-swe-agent
config specs, merged the way its ``mini -c`` merges them (a file of its config folder such
as ``default.yaml`` or ``mini_textbased.yaml``, a path, or ``key.path=value``); then the
``agent``, ``model`` and ``environment`` sections are merged on top. The agent section is
validated by mini-swe-agent's ``AgentConfig`` and the model section by its model class's
config when the task is accepted, so a bad field is an ``invalid`` result naming it.
Prompts and templates, ``step_limit``, ``cost_limit``, ``wall_time_limit_seconds`` and the
observation/format-error templates work as in mini-swe-agent. Its ``model_kwargs`` pass
through to litellm and the gateway (except where the model is: ``api_base``,
``base_url``, ``api_key``, ``custom_llm_provider`` are MegaFlow's). ``model_name`` is the
name litellm knows the model by (its provider replaced by ``openai/``; default: the
task's model); the task's model answers whatever it says. Cost is litellm's: a model
litellm has no price for costs 0 (``cost_tracking`` defaults to ``ignore_errors``), so
``cost_limit`` bites when prices are given as mini-swe-agent takes them, in a
``litellm_model_registry`` file naming ``openai/<model_name>`` (process-wide, as litellm's
registry is). The session's own budgets (steps, tokens, the task
deadline) still apply and end the task as for any scaffold.

Process settings, set on import unless already set: ``LITELLM_LOCAL_MODEL_COST_MAP=True``
and ``LITELLM_OFFLINE_MODE=true`` (litellm uses its bundled price map and fetches nothing
from the internet), ``MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT=1`` (mini-swe-agent does not
retry a failed model call: a call the session fails has ended the task, and MegaFlow
retries attempts itself), ``MSWEA_SILENT_STARTUP=1``. litellm's own client retries are
off (``max_retries: 0``) unless the model_kwargs say otherwise.

When mini-swe-agent's run returns (submitted, its step or cost limit, repeated format
errors), the scaffold calls `TaskSession.submit`: the hidden tests give the reward, as
mini-swe-agent's SWE-bench runner evaluates whatever the agent left.

Threads: mini-swe-agent's loop is synchronous, so it runs in a thread of its own (one per
task: a shared pool would cap the tasks running at once). Its model calls are blocking
HTTP requests from that thread, served by the endpoint on the task's event loop; each
command is sent to the loop with ``asyncio.run_coroutine_threadsafe`` and waited for with
a timeout (the task's deadline). When the task is cancelled (its deadline, a stale
attempt, shutdown) or the model side ends it (a budget, a model failure: the endpoint's
``error``), the command in flight is cancelled, every later command raises `_Stopped`,
and the endpoint closes (a model call in flight fails), so the thread's loop ends at its
next step; the scaffold does not wait for the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import platform
import shlex
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from megaflow.agent.model_endpoint import TaskModelEndpoint
from megaflow.core.errors import InvalidRequestError

# Before litellm is imported (by mini-swe-agent's model classes): see the module doc.
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
os.environ.setdefault("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

from minisweagent.agents import get_agent
from minisweagent.agents.default import AgentConfig
from minisweagent.config import get_config_from_spec
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models import _MODEL_CLASS_MAPPING, get_model, get_model_class
from minisweagent.utils.serialize import recursive_merge

if TYPE_CHECKING:
    from megaflow.agent.session import TaskSession

T = TypeVar("T")

DEFAULT_CONFIG = "default.yaml"
"""mini-swe-agent's own default config file (of its `DefaultAgent`)."""
DEFAULT_AGENT = "minisweagent.agents.default.DefaultAgent"
LITELLM = "minisweagent.models.litellm_model.LitellmModel"
LITELLM_TEXTBASED = "minisweagent.models.litellm_textbased_model.LitellmTextbasedModel"
LITELLM_RESPONSE = "minisweagent.models.litellm_response_model.LitellmResponseModel"
MODEL_CLASSES = ("litellm", "litellm_textbased")
"""Its model classes that MegaFlow serves (by short name; a subclass by dotted path)."""
OURS = ("api_base", "base_url", "api_key", "custom_llm_provider")
"""model_kwargs MegaFlow sets: where the model is."""
PRICES = ("input_cost_per_token", "output_cost_per_token")
"""Keys of the model section MegaFlow took before its model calls went through litellm."""
CALL_MARGIN_S = 30.0
"""How much longer than the task's deadline a bridged call may take before it is abandoned."""


def _model_class(name: str) -> type:
    """mini-swe-agent's model class `name` (a short name or a dotted path), if MegaFlow can
    serve it (its litellm chat classes and their subclasses); else a ValueError."""
    served = f"MegaFlow serves {', '.join(map(repr, MODEL_CLASSES))} or a subclass of them"
    full = _MODEL_CLASS_MAPPING.get(name, name) if name else LITELLM
    if full not in (LITELLM, LITELLM_TEXTBASED) and name in _MODEL_CLASS_MAPPING:
        raise ValueError(
            f"model.model_class: mini-swe-agent's {name!r} ({full}) does not call an "
            f"OpenAI chat endpoint through litellm; {served}"
        )
    try:
        cls = get_model_class("", full)
    except ValueError:
        raise ValueError(f"model.model_class: no such class {name!r}; {served}") from None
    import litellm
    from minisweagent.models.litellm_model import LitellmModel
    from minisweagent.models.litellm_response_model import LitellmResponseModel

    litellm.suppress_debug_info = True  # no "Provider List" print per unpriced model call

    if not isinstance(cls, type) or not issubclass(cls, LitellmModel):
        raise ValueError(f"model.model_class: {name!r} is not a litellm model class; {served}")
    if issubclass(cls, LitellmResponseModel):
        raise ValueError(
            f"model.model_class: {name!r} uses the Responses API, which the gateway does "
            f"not serve; {served}"
        )
    return cls


def _model_config_class(cls: type) -> type[BaseModel]:
    from minisweagent.models.litellm_model import LitellmModelConfig
    from minisweagent.models.litellm_textbased_model import (
        LitellmTextbasedModel,
        LitellmTextbasedModelConfig,
    )

    return (
        LitellmTextbasedModelConfig
        if issubclass(cls, LitellmTextbasedModel)
        else (LitellmModelConfig)
    )


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
        model = dict(merged.get("model") or {})
        model_class = model.get("model_class", "")
        if not isinstance(model_class, str):
            raise ValueError("model.model_class: must be a string")
        cls = _model_class(model_class)
        fields = {k: v for k, v in model.items() if k != "model_class"}
        _validated(_model_config_class(cls), {**fields, "model_name": "openai/x"}, "model")
        for key in PRICES:
            if key in model:
                raise ValueError(
                    f"model.{key}: prices are litellm's: name the model (model.model_name) "
                    "in a litellm_model_registry file"
                )
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


def model_section(
    merged: dict[str, Any], model: str, base_url: str, api_key: str, timeout_s: float
) -> dict[str, Any]:
    """The model section given to mini-swe-agent's `get_model`: the config's, pointed at
    the task's endpoint (see the module doc)."""
    section = dict(merged.get("model") or {})
    kwargs = {k: v for k, v in dict(section.get("model_kwargs") or {}).items() if k not in OURS}
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", timeout_s)
    kwargs |= {"api_base": base_url, "api_key": api_key}
    section["model_kwargs"] = kwargs
    # The name litellm knows it by (its price lookup); the task's model answers anyway.
    name = str(section.get("model_name") or "").split("/", 1)[-1] or model or "megaflow"
    section["model_name"] = f"openai/{name}"
    section.setdefault("cost_tracking", "ignore_errors")
    section.setdefault("model_class", "litellm")
    return section


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
    """mini-swe-agent's agent and model class, unmodified, in a thread: its model calls
    through the task's gateway endpoint, its commands through the session (see the
    module doc)."""

    Config = MiniSweAgentConfig

    def __init__(self, config: MiniSweAgentConfig | None = None) -> None:
        self.config = config or MiniSweAgentConfig()
        self.info: dict[str, Any] = {}  # what mini-swe-agent's run returned

    async def run(self, session: TaskSession) -> None:
        merged = self.config.merged
        env_config = MiniEnvironmentConfig.model_validate(merged.get("environment") or {})
        loop = asyncio.get_running_loop()
        timeout_s = session.task_timeout_s + CALL_MARGIN_S
        bridge = _Bridge(loop, timeout_s)
        async with TaskModelEndpoint(session, listen="tcp", record_observations=True) as endpoint:
            section = model_section(
                merged, session.task.model, endpoint.base_url, endpoint.api_key, timeout_s
            )
            model = get_model(config=section)
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
            failed: asyncio.Future[Any] = asyncio.ensure_future(endpoint.failed.wait())
            thread.start()
            try:
                waited: set[asyncio.Future[Any]] = {done, failed}
                await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
                if endpoint.error is not None:  # the model side ended the task
                    raise endpoint.error
                self.info = done.result()
            except BaseException:
                bridge.stop()  # cancelled, or it raised: its thread ends now
                if not done.done():
                    done.cancel()
                elif not done.cancelled():
                    done.exception()  # retrieved: raised as the endpoint's error instead
                raise
            finally:
                failed.cancel()
        await session.submit()
