"""The two transports of each interface: in-process calls and gRPC over loopback.

Also: errors cross the wire as typed statuses, malformed requests get a clear error
and the server keeps serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from megaflow.core import errors as e
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.clients import ModelServiceClient, SchedulerServiceClient
from megaflow.rpc.resolver import ServiceResolver
from megaflow.rpc.server import SERVICES, GrpcServer
from megaflow.rpc.status import error_from_rpc, status_for
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2, scheduler_pb2


@pytest.fixture
async def model_server() -> AsyncIterator[tuple[ModelServiceImpl, ModelServiceClient]]:
    impl = ModelServiceImpl([SimulatedBackend.fast(success_rate=1.0)])
    async with GrpcServer("127.0.0.1:0", {"model": impl}) as server:
        client = ModelServiceClient(server.address, timeout_s=10.0)
        yield impl, client
        await client.close()


def _chat() -> model_pb2.GenerateRequest:
    task = generate_tasks(1, seed=3)[0]
    return model_pb2.GenerateRequest(
        task_id=task.task_id,
        messages=[
            common_pb2.ChatMessage(role="system", content="You fix bugs."),
            common_pb2.ChatMessage(role="user", content=task.problem_statement),
        ],
    )


async def test_in_process_and_grpc_answer_the_same(
    model_server: tuple[ModelServiceImpl, ModelServiceClient],
) -> None:
    impl, client = model_server
    local = await impl.generate(_chat())
    remote = await client.generate(_chat())
    assert remote.message == local.message
    assert remote.message.tool_calls  # a real tool call crossed the wire
    assert (await client.list_models(model_pb2.ListModelsRequest())).models[0].name == "simulated"
    assert (await client.health(common_pb2.HealthRequest())).ok


async def test_typed_errors_cross_the_wire(
    model_server: tuple[ModelServiceImpl, ModelServiceClient],
) -> None:
    _, client = model_server
    with pytest.raises(e.InvalidRequestError, match="messages is empty"):
        await client.generate(model_pb2.GenerateRequest())
    with pytest.raises(e.NotFoundError, match="no model named 'nope'"):
        request = _chat()
        request.model = "nope"
        await client.generate(request)
    bad_role = _chat()
    bad_role.messages[0].role = "wizard"
    with pytest.raises(e.InvalidRequestError, match="role"):
        await client.generate(bad_role)


@pytest.mark.parametrize("kind", sorted(SERVICES))
async def test_undecodable_bytes_get_an_error_status_and_the_server_keeps_serving(
    kind: str, tmp_path: Path
) -> None:
    model = ModelServiceImpl([SimulatedBackend.fast()])
    scheduler = SchedulerServiceImpl(SqliteLedger(tmp_path / "l.sqlite"), ServiceResolver())
    from megaflow.agent.service import AgentServiceImpl
    from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService

    impls: dict[str, object] = {
        "model": model,
        "scheduler": scheduler,
        "agent": AgentServiceImpl(ServiceResolver()),
        "env": SandboxEnvironmentService(EnvServiceConfig(root_dir=tmp_path / "sandboxes")),
    }
    async with GrpcServer("127.0.0.1:0", {kind: impls[kind]}) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            service = SERVICES[kind]
            for method in service.methods:
                if method.server_streaming:
                    continue
                call = channel.unary_unary(f"/{service.full_name}/{method.name}")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"\xff\xff\xff\xff garbage", timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
                assert "is not a valid megaflow.v1." in (info.value.details() or "")
            # still serving: a well-formed health check answers
            health = channel.unary_unary(
                f"/{service.full_name}/Health"
                if kind != "scheduler"
                else f"/{service.full_name}/Status",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=bytes,
            )
            empty = (
                common_pb2.HealthRequest() if kind != "scheduler" else scheduler_pb2.StatusRequest()
            )
            assert await health(empty, timeout=5) is not None


async def test_scheduler_rejects_bad_registrations_and_submissions(tmp_path: Path) -> None:
    impl = SchedulerServiceImpl(SqliteLedger(tmp_path / "l.sqlite"), ServiceResolver())
    await impl.start()
    try:
        async with GrpcServer("127.0.0.1:0", {"scheduler": impl}) as server:
            client = SchedulerServiceClient(server.address, timeout_s=5.0)
            with pytest.raises(e.InvalidRequestError, match="not host:port"):
                await client.register_service(
                    scheduler_pb2.RegisterServiceRequest(kind=1, address="nowhere", capacity=1)
                )
            with pytest.raises(e.InvalidRequestError, match="tasks is empty"):
                await client.submit_tasks(scheduler_pb2.SubmitTasksRequest())
            with pytest.raises(e.NotFoundError, match="no run"):
                async for _ in client.watch_events(scheduler_pb2.WatchEventsRequest(run_id="x")):
                    pass
            status = await client.status(scheduler_pb2.StatusRequest())
            assert status.pending == 0
            await client.close()
    finally:
        await impl.stop()


async def test_unreachable_service_is_a_retryable_error_not_a_hang() -> None:
    client = ModelServiceClient("127.0.0.1:1", timeout_s=3.0)
    with pytest.raises(e.ServiceUnavailableError) as info:
        await client.generate(_chat())
    assert info.value.retryable
    await client.close()


@pytest.mark.parametrize(
    "error",
    [
        e.InvalidRequestError("x"),
        e.NotFoundError("x"),
        e.SandboxError("x"),
        e.ModelUnavailableError("x"),
        e.CapacityError("x"),
        e.DeadlineExceededError("x"),
        e.CancelledTaskError("x"),
    ],
)
def test_status_table_round_trips_each_error_class(error: e.MegaFlowError) -> None:
    back = error_from_rpc(status_for(error), "x", type(error).__name__)
    assert type(back) is type(error)
    assert back.retryable == error.retryable


def test_unknown_errors_are_internal_and_retryable_on_the_client() -> None:
    assert status_for(RuntimeError("bug")) is grpc.StatusCode.INTERNAL
    assert error_from_rpc(grpc.StatusCode.INTERNAL, "boom", None).retryable


def test_a_call_the_server_cancelled_is_retryable_but_a_cancelled_task_is_final() -> None:
    # A server shutting down cancels its calls: that is the platform, retry elsewhere.
    shutdown = error_from_rpc(grpc.StatusCode.CANCELLED, "Cancelled on the server side", None)
    assert isinstance(shutdown, e.ServiceUnavailableError) and shutdown.retryable
    # CancelTask on purpose names its class: final.
    cancelled = error_from_rpc(grpc.StatusCode.CANCELLED, "x", "CancelledTaskError")
    assert isinstance(cancelled, e.CancelledTaskError) and not cancelled.retryable
