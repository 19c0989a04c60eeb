"""The public pydantic models: frozen, strict, documented, and lossless to and from
the protobuf messages."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

import megaflow
from megaflow._proto_model import ProtoModel
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.v1 import common_pb2

PUBLIC_MODELS = [
    getattr(megaflow, name)
    for name in megaflow.__all__
    if isinstance(getattr(megaflow, name), type) and issubclass(getattr(megaflow, name), BaseModel)
]
# Proto fields a model carries under another name or derives (Result: status, reward),
# or that only a checkpoint's compact encoding sets (Turn: cleared again on resume, never
# in a result).
DERIVED = {
    "TaskResult": {"state", "has_reward"},
    "ScaffoldSpec": {"config_json"},
    "Turn": {"reused_prompt_ids", "observation_of"},
}


def test_the_api_exports_the_models_and_functions() -> None:
    assert {"Task", "Result", "Trajectory", "run", "arun", "connect"} <= set(megaflow.__all__)
    assert len(PUBLIC_MODELS) >= 13
    with pytest.raises(AttributeError):
        _ = megaflow.NoSuchThing  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", PUBLIC_MODELS, ids=lambda m: m.__name__)
def test_every_model_is_frozen_strict_and_documents_every_field(model: type[ProtoModel]) -> None:
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"
    for name, info in model.model_fields.items():
        assert info.description, f"{model.__name__}.{name} has no docstring"


@pytest.mark.parametrize("model", PUBLIC_MODELS, ids=lambda m: m.__name__)
def test_every_proto_field_has_a_model_field(model: type[ProtoModel]) -> None:
    message = model._message
    derived = DERIVED.get(message.__name__, set())
    missing = {f.name for f in message.DESCRIPTOR.fields} - set(model.model_fields) - derived
    assert not missing, f"{model.__name__} lacks {sorted(missing)}"


def test_a_task_round_trips_through_its_spec() -> None:
    spec = generate_tasks(1)[0]
    spec.scaffold.type, spec.scaffold.config_json = "tool-agent", '{"max_steps": 5}'
    spec.workspace.git.url, spec.workspace.git.commit = "/srv/repo.git", "abc123"
    spec.metadata["instance_id"] = "x__y-1"
    spec.setup_commands.append("pip install -e .")
    task = megaflow.Task.from_proto(spec)
    assert task.scaffold == megaflow.Scaffold(type="tool-agent", config={"max_steps": 5})
    assert task.workspace is not None and task.workspace.git is not None
    assert task.files and task.hidden_files and task.budgets is not None
    assert task.to_proto() == spec


def test_a_result_round_trips_with_reward_none_for_no_result() -> None:
    infra = common_pb2.TaskResult(
        task_id="t",
        state=common_pb2.TASK_STATE_FAILED,
        error_kind=common_pb2.ERROR_KIND_INFRA,
        error="SandboxError: died",
        attempts=3,
    )
    result = megaflow.Result.from_proto(infra)
    assert (result.status, result.error_kind, result.reward) == ("failed", "infra", None)
    assert not result.scored
    assert result.to_proto() == infra
    zero = common_pb2.TaskResult(
        task_id="t", state=common_pb2.TASK_STATE_SUCCEEDED, has_reward=True, reward=0.0
    )
    scored = megaflow.Result.from_proto(zero)
    assert scored.reward == 0.0 and scored.scored
    assert scored.to_proto() == zero


def test_a_trajectory_round_trips() -> None:
    trajectory = common_pb2.Trajectory(
        task_id="t",
        messages=[common_pb2.ChatMessage(role="user", content="fix it")],
        turns=[
            common_pb2.Turn(
                index=0,
                response=common_pb2.ChatMessage(
                    role="assistant",
                    tool_calls=[common_pb2.ToolCall(id="c", name="bash", arguments_json="{}")],
                ),
                prompt_token_ids=[1, 2, 3],
                completion_token_ids=[4],
                completion_logprobs=[-0.5],
                actions=[common_pb2.SessionAction(kind="execute", command="ls", ok=True)],
            )
        ],
        resumptions=[common_pb2.Resumption(at_turn=1, method="replay")],
    )
    model = megaflow.Trajectory.from_proto(trajectory)
    assert model.turns[0].prompt_token_ids == [1, 2, 3]
    assert model.to_proto() == trajectory


def test_bad_input_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="problem_statement"):
        megaflow.Task(problem_statement="")
    with pytest.raises(ValidationError, match="Extra inputs"):
        megaflow.Task(problem_statement="x", no_such_field=1)  # type: ignore[call-arg]
    task = megaflow.Task(problem_statement="x")
    with pytest.raises(ValidationError, match="frozen"):
        task.image = "host"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="either an artifact or a git"):
        megaflow.Workspace()
    with pytest.raises(TypeError, match="takes a TaskSpec"):
        megaflow.Task.from_proto(common_pb2.TaskResult())
