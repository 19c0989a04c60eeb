"""MegaFlow: agent tasks at scale through Model, Agent and Environment services.

The public API (everything else is internal and may change):

- Tasks and results, pydantic models converting to and from the protobuf contract
  (`to_proto` / `from_proto`): `Task` (with `Budgets`, `Limits`, `Placement`,
  `Scaffold`, `Workspace`, `GitSource`, `Resources`), `Result` (with `TestOutcome`),
  `Trajectory` (with `Turn`, `ChatMessage`, `ToolCall`, `SessionAction`,
  `Resumption`).
- `run(tasks, ...)` / `await arun(tasks, ...)`: run tasks in this process (the
  embedded default) and get their `Results`.
- `connect("host:port")`: an async `Client` of a deployment's scheduler: `submit`,
  `watch` (re-attach to a run by its id).
- For scaffold authors: `TaskSession` (what a scaffold acts through: `generate`,
  `execute`, `edit`, `submit`, ...) and `TaskOutcome` (end a task as the task's own
  failure); scaffolds plug in by entry point (`megaflow.scaffolds`).
- The errors, rooted at `MegaFlowError` (its module draws the tree).

`import megaflow` stays light: the services load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megaflow.core.errors import (
    CancelledTaskError,
    CapacityError,
    DeadlineExceededError,
    InfrastructureError,
    InvalidRequestError,
    MegaFlowError,
    ModelUnavailableError,
    NotFoundError,
    SandboxError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from megaflow._client import Client, Run, connect
    from megaflow._results import (
        ChatMessage,
        Result,
        Resumption,
        SessionAction,
        TestOutcome,
        ToolCall,
        Trajectory,
        Turn,
    )
    from megaflow._run import Results, arun, run
    from megaflow._tasks import (
        Budgets,
        GitSource,
        Limits,
        Placement,
        Resources,
        Scaffold,
        Task,
        Workspace,
    )
    from megaflow.agent.session import TaskOutcome, TaskSession

__version__ = "0.1.0"

# name -> private module that defines it (imported on first use)
_LAZY = {
    **dict.fromkeys(
        ("Budgets", "GitSource", "Limits", "Placement", "Resources", "Scaffold", "Task"),
        "megaflow._tasks",
    ),
    "Workspace": "megaflow._tasks",
    **dict.fromkeys(
        (
            "ChatMessage",
            "Result",
            "Resumption",
            "SessionAction",
            "TestOutcome",
            "ToolCall",
            "Trajectory",
            "Turn",
        ),
        "megaflow._results",
    ),
    **dict.fromkeys(("Results", "arun", "run"), "megaflow._run"),
    **dict.fromkeys(("Client", "Run", "connect"), "megaflow._client"),
    **dict.fromkeys(("TaskOutcome", "TaskSession"), "megaflow.agent.session"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megaflow' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Budgets",
    "CancelledTaskError",
    "CapacityError",
    "ChatMessage",
    "Client",
    "DeadlineExceededError",
    "GitSource",
    "InfrastructureError",
    "InvalidRequestError",
    "Limits",
    "MegaFlowError",
    "ModelUnavailableError",
    "NotFoundError",
    "Placement",
    "Resources",
    "Result",
    "Results",
    "Resumption",
    "Run",
    "SandboxError",
    "Scaffold",
    "ServiceUnavailableError",
    "SessionAction",
    "Task",
    "TaskOutcome",
    "TaskSession",
    "TestOutcome",
    "ToolCall",
    "Trajectory",
    "Turn",
    "Workspace",
    "__version__",
    "arun",
    "connect",
    "run",
]
