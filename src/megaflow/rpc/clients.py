"""gRPC clients: the second transport of each service interface.

Each client has the same methods as the implementation it talks to (see
`megaflow.contract`), so callers cannot tell the transports apart. Every call has a
deadline; a failed call raises the MegaFlow error the service raised, or the one its
status code maps to (`megaflow.rpc.status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from megaflow.core import jitter
from megaflow.core.errors import (
    AuthenticationError,
    CancelledTaskError,
    DeadlineExceededError,
    MegaFlowError,
    ServiceUnavailableError,
)
from megaflow.rpc import auth
from megaflow.rpc.server import CHANNEL_OPTIONS, SERVICES
from megaflow.rpc.status import ADDRESS_METADATA_KEY, ERROR_METADATA_KEY, error_from_rpc
from megaflow.v1 import agent_pb2, common_pb2, env_pb2, model_pb2, scheduler_pb2

R = TypeVar("R", bound=Message)
log = logging.getLogger(__name__)

# Slack added to a call's deadline beyond the budget the request itself carries.
DEADLINE_SLACK_S = 10.0


def _translate(address: str, error: grpc.aio.AioRpcError, tls: bool = False) -> MegaFlowError:
    class_name, unreachable = None, ""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            class_name = str(value)
        elif key == ADDRESS_METADATA_KEY:
            unreachable = str(value)
    code = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.UNAUTHENTICATED or class_name == "AuthenticationError":
        details = details.removeprefix("AuthenticationError: ")
        return AuthenticationError(f"{address} refused the call: {details}")
    if class_name is None and code is grpc.StatusCode.UNAVAILABLE and _tls_failure(details):
        return AuthenticationError(
            f"{address}: the TLS handshake failed ({details.strip()}): both sides need "
            "certificates from the deployment's CA (--tls-cert, --tls-key, --tls-ca)"
        )
    if class_name is None and code is grpc.StatusCode.UNAVAILABLE:
        if not tls and "socket closed" in details.lower():
            details += (
                " (a service that requires mutual TLS closes plain connections: if the "
                "deployment uses TLS, give --tls-cert, --tls-key and --tls-ca)"
            )
        return ServiceUnavailableError(f"{address} unreachable: {details}", address=address)
    if class_name is None and code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"call to {address} passed its deadline")
    return error_from_rpc(code, details, class_name, unreachable)


def _tls_failure(details: str) -> bool:
    """Whether an UNAVAILABLE's details say the TLS handshake failed (a certificate
    refused, or missing): retrying will not help."""
    lowered = details.lower()
    return any(
        word in lowered
        for word in ("handshake", "ssl_error", "certificate_verify", "tls", "peer did not return")
    )


class GrpcClient:
    """A channel to one service address, with deadlines and error translation.

    `security`: the credentials every call carries (default: this process's,
    `megaflow.rpc.auth.current()`); a service that refuses them raises
    `AuthenticationError` (never retried)."""

    kind: str = ""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        security: auth.RpcSecurity | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.security = security if security is not None else auth.current()
        self._metadata = self.security.call_metadata()
        self._channel = self.security.channel(address, CHANNEL_OPTIONS)
        self._service = SERVICES[self.kind].full_name

    async def _unary(
        self, method: str, request: Message, out: type[R], timeout_s: float | None
    ) -> R:
        call = self._channel.unary_unary(
            f"/{self._service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=out.FromString,
        )
        try:
            response: R = await call(
                request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(self.address, error, self.security.tls) from None
        return response

    async def _stream(
        self, method: str, request: Message, out: type[R], timeout_s: float | None
    ) -> AsyncIterator[R]:
        call = self._channel.unary_stream(
            f"/{self._service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=out.FromString,
        )
        try:
            async for item in call(request, timeout=timeout_s, metadata=self._metadata):
                yield item
        except grpc.aio.AioRpcError as error:
            raise _translate(self.address, error, self.security.tls) from None

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        return await self._unary("Health", request, common_pb2.HealthResponse, 5.0)

    async def reconnect(self) -> None:
        """A fresh channel: a channel that failed for a while waits out gRPC's reconnect
        backoff (which grows to minutes) before it tries the address again."""
        old, self._channel = (
            self._channel,
            self.security.channel(self.address, CHANNEL_OPTIONS),
        )
        await old.close()

    async def close(self) -> None:
        await self._channel.close()


class ModelServiceClient(GrpcClient):
    kind = "model"

    async def generate(
        self, request: model_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> model_pb2.GenerateResponse:
        return await self._unary("Generate", request, model_pb2.GenerateResponse, timeout_s)

    async def generate_stream(
        self, request: model_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        """`GenerateStream`: the answer's chunks as the service sends them, the whole
        stream within one deadline (`timeout_s`, default the client's). Closing the
        iterator early (or cancelling its consumer) cancels the call, and with it the
        generation on the server."""
        call = self._channel.unary_stream(
            f"/{self._service}/GenerateStream",
            request_serializer=model_pb2.GenerateRequest.SerializeToString,
            response_deserializer=model_pb2.GenerateChunk.FromString,
        )(request, timeout=timeout_s or self.timeout_s)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as error:
            raise _translate(self.address, error) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    async def list_models(
        self, request: model_pb2.ListModelsRequest, timeout_s: float | None = None
    ) -> model_pb2.ListModelsResponse:
        return await self._unary("ListModels", request, model_pb2.ListModelsResponse, timeout_s)

    async def update_weights(
        self, request: model_pb2.UpdateWeightsRequest, timeout_s: float | None = None
    ) -> model_pb2.UpdateWeightsResponse:
        return await self._unary(
            "UpdateWeights", request, model_pb2.UpdateWeightsResponse, timeout_s
        )

    async def list_replicas(
        self, request: model_pb2.ListReplicasRequest, timeout_s: float | None = None
    ) -> model_pb2.ListReplicasResponse:
        return await self._unary("ListReplicas", request, model_pb2.ListReplicasResponse, timeout_s)


class EnvironmentServiceClient(GrpcClient):
    kind = "env"

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest, timeout_s: float | None = None
    ) -> env_pb2.CreateEnvironmentResponse:
        budget = timeout_s or (request.setup_timeout_s or self.timeout_s) + DEADLINE_SLACK_S
        return await self._unary(
            "CreateEnvironment", request, env_pb2.CreateEnvironmentResponse, budget
        )

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest, timeout_s: float | None = None
    ) -> env_pb2.ExecuteStepResponse:
        budget = timeout_s or (request.timeout_s or self.timeout_s) + DEADLINE_SLACK_S
        return await self._unary("ExecuteStep", request, env_pb2.ExecuteStepResponse, budget)

    async def get_observation(
        self, request: env_pb2.GetObservationRequest, timeout_s: float | None = None
    ) -> env_pb2.GetObservationResponse:
        return await self._unary(
            "GetObservation", request, env_pb2.GetObservationResponse, timeout_s
        )

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest, timeout_s: float | None = None
    ) -> env_pb2.SubmitActionResponse:
        budget = timeout_s
        if budget is None and request.WhichOneof("action") == "submit":
            budget = (request.submit.scoring_timeout_s or self.timeout_s) + DEADLINE_SLACK_S
        return await self._unary("SubmitAction", request, env_pb2.SubmitActionResponse, budget)

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest, timeout_s: float | None = None
    ) -> env_pb2.ReleaseEnvironmentResponse:
        return await self._unary(
            "ReleaseEnvironment", request, env_pb2.ReleaseEnvironmentResponse, timeout_s
        )

    async def heartbeat(
        self, request: env_pb2.EnvHeartbeatRequest, timeout_s: float | None = None
    ) -> env_pb2.EnvHeartbeatResponse:
        return await self._unary("Heartbeat", request, env_pb2.EnvHeartbeatResponse, timeout_s)

    async def snapshot_environment(
        self, request: env_pb2.SnapshotEnvironmentRequest, timeout_s: float | None = None
    ) -> env_pb2.SnapshotEnvironmentResponse:
        return await self._unary(
            "SnapshotEnvironment", request, env_pb2.SnapshotEnvironmentResponse, timeout_s or 300.0
        )

    async def suspend_environment(
        self, request: env_pb2.SuspendEnvironmentRequest, timeout_s: float | None = None
    ) -> env_pb2.SuspendEnvironmentResponse:
        return await self._unary(
            "SuspendEnvironment", request, env_pb2.SuspendEnvironmentResponse, timeout_s
        )


class AgentServiceClient(GrpcClient):
    kind = "agent"

    async def run_task(
        self, request: agent_pb2.RunTaskRequest, timeout_s: float | None = None
    ) -> agent_pb2.RunTaskResponse:
        budget = timeout_s
        if budget is None and request.task.budgets.task_timeout_s:
            budget = request.task.budgets.task_timeout_s * 2 + 60.0  # setup + scoring around it
        return await self._unary("RunTask", request, agent_pb2.RunTaskResponse, budget or 3600.0)

    async def cancel_task(
        self, request: agent_pb2.CancelTaskRequest, timeout_s: float | None = None
    ) -> agent_pb2.CancelTaskResponse:
        return await self._unary("CancelTask", request, agent_pb2.CancelTaskResponse, timeout_s)


class SchedulerServiceClient(GrpcClient):
    kind = "scheduler"

    async def submit_tasks(
        self, request: scheduler_pb2.SubmitTasksRequest, timeout_s: float | None = None
    ) -> scheduler_pb2.SubmitTasksResponse:
        return await self._unary(
            "SubmitTasks", request, scheduler_pb2.SubmitTasksResponse, timeout_s
        )

    def watch_events(
        self,
        request: scheduler_pb2.WatchEventsRequest,
        timeout_s: float | None = None,
        *,
        reconnect_for_s: float = 300.0,
    ) -> AsyncIterator[scheduler_pb2.TaskEvent]:
        """Stream the run's events; `timeout_s` None means until the run finishes.

        When the stream breaks (the scheduler died, or restarts), the watch reconnects
        with backoff (0.25 s doubling to 5 s, on a fresh channel) for up to
        `reconnect_for_s` seconds of outage (0: raise at once). The scheduler replays
        the run's finished tasks from its ledger on every (re)connection; a task's
        TASK_FINISHED already yielded here is not yielded again."""
        return self._watch(request, timeout_s, reconnect_for_s)

    async def _watch(
        self,
        request: scheduler_pb2.WatchEventsRequest,
        timeout_s: float | None,
        reconnect_for_s: float,
    ) -> AsyncIterator[scheduler_pb2.TaskEvent]:
        finished: set[str] = set()
        backoff, down_since = 0.25, 0.0
        while True:
            try:
                async for event in self._stream(
                    "WatchEvents", request, scheduler_pb2.TaskEvent, timeout_s
                ):
                    backoff, down_since = 0.25, 0.0
                    if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
                        if event.task_id in finished:
                            continue
                        finished.add(event.task_id)
                    yield event
                    if event.type == scheduler_pb2.EVENT_TYPE_RUN_FINISHED:
                        return
                error: MegaFlowError = ServiceUnavailableError(
                    f"{self.address} ended the event stream before the run finished"
                )
            except MegaFlowError as raised:
                if not (raised.retryable or isinstance(raised, CancelledTaskError)):
                    raise
                error = raised
            now = time.monotonic()
            down_since = down_since or now
            if not reconnect_for_s or now - down_since > reconnect_for_s:
                raise error
            log.warning("event stream of run %s broke (%s); reconnecting", request.run_id, error)
            await asyncio.sleep(jitter.full(backoff))  # jittered: watchers do not reconnect in step
            backoff = min(backoff * 2, 5.0)
            await self.reconnect()

    async def register_service(
        self, request: scheduler_pb2.RegisterServiceRequest, timeout_s: float | None = None
    ) -> scheduler_pb2.RegisterServiceResponse:
        return await self._unary(
            "RegisterService", request, scheduler_pb2.RegisterServiceResponse, timeout_s
        )

    async def status(
        self, request: scheduler_pb2.StatusRequest, timeout_s: float | None = None
    ) -> scheduler_pb2.StatusResponse:
        return await self._unary("Status", request, scheduler_pb2.StatusResponse, timeout_s)
