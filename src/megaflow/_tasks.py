"""`megaflow.Task` and its parts: what one agent task is, as a pydantic model that
converts to and from `megaflow.v1.TaskSpec` (`to_proto` / `from_proto`)."""

from __future__ import annotations

import json
from typing import Any, Protocol, Self

from google.protobuf.message import Message
from pydantic import Field, model_validator

from megaflow._proto_model import ProtoModel
from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import common_pb2


class Budgets(ProtoModel):
    """Budgets of one task, each separate; 0 means the deployment's default."""

    _message = common_pb2.TaskBudgets

    max_steps: int = Field(default=0, ge=0)
    """Model turns at most."""
    max_tokens: int = Field(default=0, ge=0)
    """Prompt plus completion tokens at most, over the whole task."""
    step_timeout_s: float = Field(default=0.0, ge=0)
    """Seconds one command may run."""
    setup_timeout_s: float = Field(default=0.0, ge=0)
    """Seconds to create the environment."""
    task_timeout_s: float = Field(default=0.0, ge=0)
    """Seconds for the agent loop, all attempts together."""
    scoring_timeout_s: float = Field(default=0.0, ge=0)
    """Seconds for the evaluation after the agent submits."""


class Limits(ProtoModel):
    """Resource limits of the task's environment; 0 means the service's default."""

    _message = common_pb2.EnvLimits

    memory_mib: int = Field(default=0, ge=0)
    """Memory of the sandbox."""
    pids: int = Field(default=0, ge=0)
    """Processes at once."""
    output_bytes: int = Field(default=0, ge=0)
    """Output one command may return."""
    cpu_shares: int = Field(default=0, ge=0)
    """Relative CPU weight (1024 = one share)."""
    disk_mib: int = Field(default=0, ge=0)
    """Workspace disk quota."""


class Placement(ProtoModel):
    """Where and how the task's environment runs."""

    _message = common_pb2.EnvPlacement

    backend: str = ""
    """Sandbox backend: "local" (bubblewrap, the default) or "docker"."""
    runtime: str = ""
    """Docker only: "runc" (default) or "runsc" (gVisor)."""
    mode: str = ""
    """"ephemeral" (a fresh sandbox, the default) or "persistent" (pooled, reset)."""


class Scaffold(ProtoModel):
    """Which agent scaffold runs the task, and its settings."""

    _message = common_pb2.ScaffoldSpec

    type: str = Field(min_length=1)
    """A registered scaffold name ("tool-agent" is the built-in) or "package.module:Class"."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The scaffold's config (a JSON object); empty = its defaults."""

    def to_proto(self) -> common_pb2.ScaffoldSpec:
        return common_pb2.ScaffoldSpec(
            type=self.type, config_json=json.dumps(self.config) if self.config else ""
        )

    @classmethod
    def from_proto(cls, message: Message) -> Self:
        assert isinstance(message, common_pb2.ScaffoldSpec)
        config = json.loads(message.config_json) if message.config_json else {}
        return cls(type=message.type, config=config)


class GitSource(ProtoModel):
    """A git repository checked out into the workspace."""

    _message = common_pb2.GitSource

    url: str = Field(min_length=1)
    """Anything `git clone` takes: a URL, a local path, a bare repository."""
    commit: str = ""
    """Checked out detached; "" = the default branch's head."""


class Workspace(ProtoModel):
    """Where the task's repository comes from, by reference (exactly one of the two)."""

    _message = common_pb2.WorkspaceSource

    artifact: str | None = None
    """"sha256:<hex>": a tar archive in the artifact store, cached per host."""
    git: GitSource | None = None
    """A git repository and commit."""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.artifact is None) == (self.git is None):
            raise ValueError("a workspace is either an artifact or a git repository")
        return self

    @classmethod
    def from_proto(cls, message: Message) -> Self:
        assert isinstance(message, common_pb2.WorkspaceSource)
        if message.WhichOneof("source") == "git":
            return cls(git=GitSource.from_proto(message.git))
        return cls(artifact=message.artifact)


class Resources(ProtoModel):
    """What the task needs from the environment host it runs on; 0/empty = nothing."""

    _message = common_pb2.ResourceRequirements

    cpu_millis: int = Field(default=0, ge=0)
    """CPU in millicores, held while an attempt runs."""
    memory_mib: int = Field(default=0, ge=0)
    """Memory, held likewise."""
    gpus: int = Field(default=0, ge=0)
    """Whole GPUs, held likewise."""
    accelerator: str = ""
    """Accelerator kind the host must have (e.g. "h100"); "" = any."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels the host must carry, each with this exact value."""


class Task(ProtoModel):
    """One agent task: a problem in an environment, and how it is scored.

    `Task.from_proto(spec)` and `task.to_proto()` convert from and to `TaskSpec`."""

    _message = common_pb2.TaskSpec

    problem_statement: str = Field(min_length=1)
    """What the agent is asked to do."""
    task_id: str = ""
    """Unique within a deployment; "" = the scheduler names it."""
    family: str = ""
    """The kind of task, e.g. "swe-synth" or "swe-bench"."""
    image: str = ""
    """The environment's image: "host" (read-only host system) or an image reference."""
    files: dict[str, bytes] = Field(default_factory=dict)
    """Small files the agent sees, path -> content (a repository goes in `workspace`)."""
    hidden_files: dict[str, bytes] = Field(default_factory=dict)
    """Files copied in only after the agent submits, before `eval_command` runs."""
    eval_command: str = ""
    """Scores the submission: exit status 0 means reward 1."""
    setup_commands: list[str] = Field(default_factory=list)
    """Run in the workspace before the agent starts (install steps)."""
    workspace: Workspace | None = None
    """The repository by reference (never its files in a message)."""
    scaffold: Scaffold | None = None
    """The agent scaffold; None = the deployment's default (the built-in tool agent)."""
    model: str = ""
    """The model to use; "" = the deployment's default."""
    budgets: Budgets | None = None
    """Step, token and time budgets; None = the defaults."""
    limits: Limits | None = None
    """Sandbox resource limits; None = the service's defaults."""
    placement: Placement | None = None
    """Sandbox backend, runtime and mode; None = local, ephemeral."""
    resources: Resources | None = None
    """Host resources the task needs; None = one unit of a host's capacity."""
    max_attempts: int = Field(default=0, ge=0)
    """Attempts at most when the infrastructure fails; 0 = the default."""
    user: str = ""
    """Who submitted it: the key of per-user quotas."""
    priority: int = 0
    """Higher is dispatched first."""
    deadline_s: float = Field(default=0.0, ge=0)
    """Latency SLA in seconds from submission (earliest deadline first); 0 = none."""
    pool: str = ""
    """A named resource pool of the scheduler's policy."""
    metadata: dict[str, str] = Field(default_factory=dict)
    """Where the task came from (instance_id, repo, version, ...)."""

    def to_proto(self) -> common_pb2.TaskSpec:
        spec: common_pb2.TaskSpec = super().to_proto()
        return spec


class SupportsToProto(Protocol):
    """Anything that converts itself to a `TaskSpec` (e.g. a task source's own model)."""

    def to_proto(self) -> Any: ...


TaskLike = Task | common_pb2.TaskSpec | SupportsToProto


def task_spec(task: TaskLike) -> common_pb2.TaskSpec:
    """A `TaskSpec` (a copy) from a `Task`, a `TaskSpec` or anything with `to_proto()`."""
    if isinstance(task, common_pb2.TaskSpec):
        spec = common_pb2.TaskSpec()
        spec.CopyFrom(task)
        return spec
    to_proto = getattr(task, "to_proto", None)
    if to_proto is None:
        raise InvalidRequestError(
            f"a task must be a megaflow.Task, a TaskSpec or have to_proto(), "
            f"not {type(task).__name__}"
        )
    spec = to_proto()
    if not isinstance(spec, common_pb2.TaskSpec):
        raise InvalidRequestError(
            f"{type(task).__name__}.to_proto() returned {type(spec).__name__}, not a TaskSpec"
        )
    return spec


def scaffold_spec(scaffold: str | dict[str, Any] | Scaffold) -> common_pb2.ScaffoldSpec:
    """A `ScaffoldSpec` from a name, a {"type": ..., ...config} dict or a `Scaffold`."""
    if isinstance(scaffold, Scaffold):
        return scaffold.to_proto()
    if isinstance(scaffold, str):
        return Scaffold(type=scaffold).to_proto()
    config = dict(scaffold)
    kind = config.pop("type", None)
    if not isinstance(kind, str) or not kind:
        raise InvalidRequestError(f"a scaffold dict needs a 'type' (a name): {scaffold!r}")
    return Scaffold(type=kind, config=config).to_proto()


def task_specs(
    tasks: list[TaskLike] | tuple[TaskLike, ...],
    scaffold: str | dict[str, Any] | Scaffold | None = None,
) -> list[common_pb2.TaskSpec]:
    """The specs of `tasks`, each given `scaffold` unless it names its own."""
    default = scaffold_spec(scaffold) if scaffold is not None else None
    specs = [task_spec(task) for task in tasks]
    if default is not None:
        for spec in specs:
            if not spec.HasField("scaffold") or not spec.scaffold.type:
                spec.scaffold.CopyFrom(default)
    return specs
