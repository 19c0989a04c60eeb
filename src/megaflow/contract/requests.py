"""Requests built from a task: what every caller of `CreateEnvironment` for a task
(the agent's session, `megaflow validate`) sends, in one place."""

from __future__ import annotations

from megaflow.v1 import common_pb2, env_pb2


def environment_request(
    task: common_pb2.TaskSpec, *, owner: str, setup_timeout_s: float, lease_s: float
) -> env_pb2.CreateEnvironmentRequest:
    """The `CreateEnvironmentRequest` of `task`'s environment, held by `owner`."""
    request = env_pb2.CreateEnvironmentRequest(
        owner=owner,
        image=task.image,
        files=task.files,
        hidden_files=task.hidden_files,
        eval_command=task.eval_command,
        limits=task.limits,
        setup_timeout_s=setup_timeout_s,
        lease_s=lease_s,
        placement=task.placement,
        setup_commands=task.setup_commands,
    )
    if task.HasField("workspace"):
        request.workspace.CopyFrom(task.workspace)
    return request
