"""`megaflow.Result` and `megaflow.Trajectory`: what a finished task gives back, as
pydantic models converting to and from `TaskResult` / `Trajectory` messages."""

from __future__ import annotations

from typing import Literal, Self, cast

from google.protobuf.message import Message
from pydantic import Field

from megaflow._proto_model import ProtoModel
from megaflow.deploy.run import ERROR_KIND_NAMES, ERROR_KIND_VALUES, STATE_NAMES, STATE_VALUES
from megaflow.v1 import common_pb2

Status = Literal["pending", "running", "succeeded", "failed", "unknown"]
ErrorKind = Literal["none", "task", "infra", "invalid", "cancelled", "unknown"]

# The names results.jsonl uses (`megaflow.deploy.run`), typed; a value with no name is
# "unknown".
_STATES = cast(dict[int, Status], STATE_NAMES)
_KINDS = cast(dict[int, ErrorKind], ERROR_KIND_NAMES)


class ToolCall(ProtoModel):
    """One tool call a model emitted."""

    _message = common_pb2.ToolCall

    id: str = ""
    """The call's id, answered by a tool message's `tool_call_id`."""
    name: str = ""
    """The tool's name."""
    arguments_json: str = ""
    """The arguments, a JSON object exactly as the model produced it."""


class ChatMessage(ProtoModel):
    """One chat message, in the OpenAI chat-completions shape."""

    _message = common_pb2.ChatMessage

    role: str = ""
    """system | user | assistant | tool."""
    content: str = ""
    """The text."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """Assistant: the tools it called."""
    tool_call_id: str = ""
    """Tool: which call this answers."""
    name: str = ""
    """Tool: the tool's name."""


class SessionAction(ProtoModel):
    """One action on the environment, with what it returned (what resume replays)."""

    _message = common_pb2.SessionAction

    kind: str = ""
    """"execute" | "edit" | "write" | "read"."""
    command: str = ""
    """Execute: the command."""
    timeout_s: float = 0.0
    """Execute: its budget."""
    path: str = ""
    """Edit, write, read: the file."""
    old: str = ""
    """Edit: the text replaced."""
    new: str = ""
    """Edit: its replacement."""
    content: bytes = b""
    """Write: what was written; read: what was read."""
    observation: str = ""
    """Execute: the output; otherwise the service's message."""
    exit_code: int = 0
    """Execute: the exit status."""
    timed_out: bool = False
    """Execute: whether it ran past its budget."""
    ok: bool = False
    """Edit, write, read: whether it succeeded."""


class Turn(ProtoModel):
    """One model call and what the environment answered, with exact token ids."""

    _message = common_pb2.Turn

    index: int = 0
    """Position in the trajectory, from 0."""
    prompt_delta: list[ChatMessage] = Field(default_factory=list)
    """Messages added to the conversation before this model call."""
    response: ChatMessage | None = None
    """The assistant's message."""
    observations: list[ChatMessage] = Field(default_factory=list)
    """Tool results returned to the model."""
    actions: list[SessionAction] = Field(default_factory=list)
    """The environment actions taken after this model call, in order."""
    model_version: str = ""
    """The model version that produced the response."""
    replica: str = ""
    """The model replica that served it."""
    prompt_tokens: int = 0
    """Prompt length in tokens."""
    completion_tokens: int = 0
    """Completion length in tokens."""
    prompt_token_ids: list[int] = Field(default_factory=list)
    """The prompt's token ids, exactly as the backend saw them."""
    completion_token_ids: list[int] = Field(default_factory=list)
    """The completion's token ids, exactly as the backend produced them."""
    completion_logprobs: list[float] = Field(default_factory=list)
    """The log-probability of each completion token."""
    model_latency_s: float = 0.0
    """Seconds the model call took."""
    env_latency_s: float = 0.0
    """Seconds the environment actions took."""


class Resumption(ProtoModel):
    """From `at_turn` on, the trajectory was continued by another attempt."""

    _message = common_pb2.Resumption

    at_turn: int = 0
    """The first turn made by `attempt_id`."""
    from_attempt_id: str = ""
    """The attempt whose checkpoint was resumed."""
    attempt_id: str = ""
    """The attempt that resumed."""
    method: str = ""
    """How the environment was restored ("replay")."""
    replayed_actions: int = 0
    """Recorded actions re-applied, each observation verified."""
    restore_s: float = 0.0
    """Seconds to restore the environment."""


class Trajectory(ProtoModel):
    """Everything the agent did: the conversation, each turn's tokens, resumptions."""

    _message = common_pb2.Trajectory

    task_id: str = ""
    """The task."""
    attempt_id: str = ""
    """The attempt that finished it."""
    messages: list[ChatMessage] = Field(default_factory=list)
    """The whole conversation, in order."""
    turns: list[Turn] = Field(default_factory=list)
    """One per model call."""
    resumptions: list[Resumption] = Field(default_factory=list)
    """Where other attempts continued from a checkpoint; empty = one attempt throughout."""


class TestOutcome(ProtoModel):
    """The outcome of one test of the evaluation."""

    __test__ = False  # not a pytest test class

    _message = common_pb2.TestOutcome

    test_id: str = ""
    """The test's id, exactly as the test runner names it."""
    status: str = ""
    """"passed" | "failed" | "error" | "skipped" | "missing"."""
    group: str = ""
    """E.g. "FAIL_TO_PASS" or "PASS_TO_PASS"; "" = none."""


class Result(ProtoModel):
    """A task's terminal outcome. `reward` is None when there is no result (the
    platform failed: `error_kind` "infra"; or the request was invalid), never 0."""

    _message = common_pb2.TaskResult
    _custom = frozenset({"error_kind", "reward"})

    task_id: str
    """The task."""
    status: Status
    """"succeeded" (submitted and scored) or "failed" (see `error_kind`)."""
    reward: float | None = None
    """The evaluation's reward; None = no result."""
    error_kind: ErrorKind = "none"
    """"task" (the task's fault: final, reward 0), "infra" (the platform's: no reward),
    "invalid", "cancelled", or "none"."""
    error: str = ""
    """What went wrong, for people."""
    error_type: str = ""
    """The MegaFlow error class that ended the task (e.g. "SandboxError"); "" = none."""
    attempt_id: str = ""
    """The attempt that finished it."""
    attempts: int = 0
    """Attempts made (infrastructure failures are retried)."""
    steps: int = 0
    """Model turns taken."""
    prompt_tokens: int = 0
    """Prompt tokens, all turns."""
    completion_tokens: int = 0
    """Completion tokens, all turns."""
    duration_s: float = 0.0
    """Seconds the last attempt took."""
    setup_s: float = 0.0
    """Seconds creating the environment."""
    teardown_s: float = 0.0
    """Seconds releasing it."""
    eval_output: str = ""
    """What the evaluation printed."""
    tests: list[TestOutcome] = Field(default_factory=list)
    """Per-test outcomes, where the evaluation reports them."""
    trajectory: Trajectory | None = None
    """The trajectory; None when the task finished without one."""

    @property
    def scored(self) -> bool:
        """Whether the task has a reward (a rerun of its run keeps it)."""
        return self.reward is not None

    def to_proto(self) -> common_pb2.TaskResult:
        """The `TaskResult` (the trajectory is a message of its own: `trajectory.to_proto()`)."""
        message: common_pb2.TaskResult = super().to_proto()
        state = STATE_VALUES.get(self.status, common_pb2.TASK_STATE_UNSPECIFIED)
        kind = ERROR_KIND_VALUES.get(self.error_kind, common_pb2.ERROR_KIND_NONE)
        message.state, message.error_kind = state, kind  # type: ignore[assignment]
        message.has_reward = self.reward is not None
        message.reward = self.reward or 0.0
        return message

    @classmethod
    def from_proto(cls, message: Message, trajectory: Message | None = None) -> Self:
        """The result of `message` (a `TaskResult`), with its `Trajectory` if given."""
        if not isinstance(message, common_pb2.TaskResult):
            raise TypeError(f"Result.from_proto takes a TaskResult, not {type(message).__name__}")
        values = cls._values(message)
        values["status"] = _STATES.get(message.state, "unknown")
        values["error_kind"] = _KINDS.get(message.error_kind, "unknown")
        values["reward"] = message.reward if message.has_reward else None
        if trajectory is not None:
            values["trajectory"] = Trajectory.from_proto(trajectory)
        return cls.model_validate(values)
