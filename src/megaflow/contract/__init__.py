"""The contract: one Python interface per service, on the protobuf messages.

Each interface has two transports: the implementation object itself (in-process,
used by the embedded mode) and a gRPC client in `megaflow.rpc.clients` with the same
methods. Request and response types are the generated messages of
`proto/megaflow/v1/`, so what crosses a process boundary and what crosses a
function call are the same values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from megaflow.v1 import agent_pb2, common_pb2, env_pb2, model_pb2, scheduler_pb2


@runtime_checkable
class ModelService(Protocol):
    """Chat completions."""

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse: ...

    async def list_models(
        self, request: model_pb2.ListModelsRequest
    ) -> model_pb2.ListModelsResponse: ...

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse: ...

    async def update_weights(
        self, request: model_pb2.UpdateWeightsRequest
    ) -> model_pb2.UpdateWeightsResponse: ...

    async def list_replicas(
        self, request: model_pb2.ListReplicasRequest
    ) -> model_pb2.ListReplicasResponse: ...


@runtime_checkable
class EnvironmentService(Protocol):
    """Sandboxes and the step API (`ExecuteStep`, `GetObservation`, `SubmitAction`)."""

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse: ...

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse: ...

    async def get_observation(
        self, request: env_pb2.GetObservationRequest
    ) -> env_pb2.GetObservationResponse: ...

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse: ...

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse: ...

    async def heartbeat(
        self, request: env_pb2.EnvHeartbeatRequest
    ) -> env_pb2.EnvHeartbeatResponse: ...

    async def snapshot_environment(
        self, request: env_pb2.SnapshotEnvironmentRequest
    ) -> env_pb2.SnapshotEnvironmentResponse: ...

    async def suspend_environment(
        self, request: env_pb2.SuspendEnvironmentRequest
    ) -> env_pb2.SuspendEnvironmentResponse: ...

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse: ...


@runtime_checkable
class AgentService(Protocol):
    """Agent loops: a task in, a result and a trajectory out."""

    async def run_task(self, request: agent_pb2.RunTaskRequest) -> agent_pb2.RunTaskResponse: ...

    async def cancel_task(
        self, request: agent_pb2.CancelTaskRequest
    ) -> agent_pb2.CancelTaskResponse: ...

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse: ...


@runtime_checkable
class SchedulerService(Protocol):
    """The task queue, the ledger and the registry of services."""

    async def submit_tasks(
        self, request: scheduler_pb2.SubmitTasksRequest
    ) -> scheduler_pb2.SubmitTasksResponse: ...

    def watch_events(
        self, request: scheduler_pb2.WatchEventsRequest
    ) -> AsyncIterator[scheduler_pb2.TaskEvent]: ...

    async def register_service(
        self, request: scheduler_pb2.RegisterServiceRequest
    ) -> scheduler_pb2.RegisterServiceResponse: ...

    async def status(
        self, request: scheduler_pb2.StatusRequest
    ) -> scheduler_pb2.StatusResponse: ...


__all__ = ["AgentService", "EnvironmentService", "ModelService", "SchedulerService"]
