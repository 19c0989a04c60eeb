"""Agent scaffolds: what decides an agent's next step, plugged into the platform's
`TaskSession` (`megaflow.agent.session`).

A scaffold is a class with a pydantic ``Config`` and an ``async run(session)``::

    class MyAgent:
        Config = MyAgentConfig          # pydantic; validated from TaskSpec.scaffold.config_json

        def __init__(self, config: MyAgentConfig) -> None: ...

        async def run(self, session: TaskSession) -> None:
            reply = await session.generate([ChatMessage(role="user", content=...)])
            step = await session.execute("ls")
            ...
            await session.submit()

A task names its scaffold in ``TaskSpec.scaffold`` (``type`` and ``config_json``); the
name resolves through `SCAFFOLDS`: MegaFlow's built-ins (``tool-agent``, the default;
``command`` and its preset ``qwen-code``, CLI agents run inside the sandbox;
``mini-swe-agent``, `megaflow.agent.mini_swe_agent`),
the entry points of group ``megaflow.scaffolds`` of any installed package, or a dotted
path ``package.module:Class``. One instance runs one task (it may keep state).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from megaflow.core.registry import Registry, load_dotted, parse_config
from megaflow.v1 import common_pb2

if TYPE_CHECKING:
    from megaflow.agent.session import TaskSession

DEFAULT_SCAFFOLD = "tool-agent"


class Scaffold(Protocol):
    """Runs one task through its session until it submits (or gives up)."""

    async def run(self, session: TaskSession) -> None: ...


def _is_scaffold_class(obj: Any) -> bool:
    config = getattr(obj, "Config", None)
    return (
        isinstance(obj, type)
        and callable(getattr(obj, "run", None))
        and isinstance(config, type)
        and issubclass(config, BaseModel)
    )


def _tool_agent() -> type:
    from megaflow.agent.tool_agent import ToolAgentScaffold

    return ToolAgentScaffold


def _command() -> type:
    from megaflow.agent.command_scaffold import CommandScaffold

    return CommandScaffold


def _qwen_code() -> type:
    from megaflow.agent.command_scaffold import QwenCodeScaffold

    return QwenCodeScaffold


SCAFFOLDS: Registry[type] = Registry("megaflow.scaffolds", "scaffold", check=_is_scaffold_class)
SCAFFOLDS.add(DEFAULT_SCAFFOLD, _tool_agent)
SCAFFOLDS.add("command", _command)  # a CLI agent run inside the sandbox
SCAFFOLDS.add("qwen-code", _qwen_code)
# mini-swe-agent (the optional extra `mini-swe-agent`): imported only when a task names it.
SCAFFOLDS.add(
    "mini-swe-agent",
    functools.partial(load_dotted, "megaflow.agent.mini_swe_agent:MiniSweAgentScaffold"),
)


def scaffold_factory(spec: common_pb2.ScaffoldSpec | None) -> Callable[[], Scaffold]:
    """What makes the scaffold `spec` names, its config validated now:
    InvalidRequestError for an unknown scaffold or a bad config."""
    if spec is None or (not spec.type and not spec.config_json):
        return default_scaffold
    name = spec.type or DEFAULT_SCAFFOLD
    cls = SCAFFOLDS.get(name)
    config = parse_config(cls.Config, spec.config_json, f"scaffold {name!r}")  # type: ignore[attr-defined]
    return functools.partial(cls, config)


def default_scaffold() -> Scaffold:
    """The built-in tool agent with its default config."""
    cls = SCAFFOLDS.get(DEFAULT_SCAFFOLD)
    return cls(_default_config(cls))  # type: ignore[no-any-return]


@functools.cache
def _default_config(cls: type) -> BaseModel:
    return cls.Config()  # type: ignore[attr-defined,no-any-return]
