"""Versions and hot swap: warm, shift, drain, retire — with zero failed requests."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from megaflow.core.errors import InvalidRequestError, ModelUnavailableError
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig
from megaflow.model.replicas import HealthConfig, ReplicaState
from megaflow.model.service import ModelServiceConfig, ModelServiceImpl
from megaflow.rpc.clients import ModelServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.testing.llm_katan import free_port
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2

FAST = LatencyConfig(
    slots=32, prefill_s_per_token=0.0, decode_s_per_token=0.0, overhead_s=1.0, time_scale=0.005
)  # 5 ms a request, 32 at a time


def _sim(version: str) -> SimulatedBackend:
    return SimulatedBackend(version=version, latency=GpuLatencyModel(FAST))


def _chat(task_id: str) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        task_id=task_id, messages=[common_pb2.ChatMessage(role="user", content="fix it")]
    )


async def test_hot_swap_under_load_fails_no_request() -> None:
    old = [_sim("sim-1"), _sim("sim-1")]
    new = [_sim("sim-2"), _sim("sim-2")]
    service = ModelServiceImpl([old[0]])
    service.add_replica(old[1])
    results: list[model_pb2.GenerateResponse | BaseException] = []
    swap_done_at: list[int] = []
    in_flight_old_at_swap: list[int] = []
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with gate:
            try:
                results.append(await service.generate(_chat(f"task-{i % 200}")))
            except Exception as error:
                results.append(error)

    async def swap() -> None:
        while len(results) < 300:
            await asyncio.sleep(0.001)
        report = await service.deploy_version("simulated", "sim-2", new)
        swap_done_at.append(len(results))
        in_flight_old_at_swap.append(sum(b.latency.in_flight for b in old))
        assert report.previous_version == "sim-1" and len(report.retired) == 2
        assert report.drained

    try:
        await asyncio.gather(swap(), *(one(i) for i in range(1000)))
    finally:
        await service.stop()
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == []
    responses = [r for r in results if isinstance(r, model_pb2.GenerateResponse)]
    assert len(responses) == 1000
    # Every response is tagged with the version (and a replica of that version) that served it.
    for r in responses:
        assert r.model_version in {"sim-1", "sim-2"}
        assert r.replica.startswith(f"simulated/{r.model_version}/")
    versions = Counter(r.model_version for r in responses)
    assert versions["sim-1"] == sum(b.latency.requests for b in old)
    assert versions["sim-2"] == sum(b.latency.requests for b in new)
    assert versions["sim-1"] >= 300 and versions["sim-2"] > 0  # the swap happened mid-run
    # Nothing is served by the old version once the swap has completed.
    assert swap_done_at and in_flight_old_at_swap == [0]
    assert all(r.model_version == "sim-2" for r in responses[swap_done_at[0] :])
    assert {r.state for r in service.replicas()} == {ReplicaState.RETIRED}  # after stop()


async def test_a_new_version_that_fails_its_health_checks_is_not_deployed() -> None:
    service = ModelServiceImpl(
        [_sim("sim-1")], config=ModelServiceConfig(warm_timeout_s=0.5, health=HealthConfig())
    )
    dead = OpenAIBackend(
        OpenAIBackendConfig(
            base_url=f"http://127.0.0.1:{free_port()}", model="m", request_timeout_s=0.2
        )
    )
    try:
        with pytest.raises(ModelUnavailableError, match="did not pass health checks"):
            await service.deploy_version("simulated", "broken", [dead])
        response = await service.generate(_chat("t"))
        assert response.model_version == "sim-1"  # the old version kept serving
        assert [r.version for r in service.replicas()] == ["sim-1"]
        with pytest.raises(InvalidRequestError):
            await service.deploy_version("simulated", "", [_sim("x")])
    finally:
        await dead.close()
        await service.stop()


async def test_update_weights_over_grpc() -> None:
    first = _sim("sim-1")
    service = ModelServiceImpl([first])
    async with GrpcServer("127.0.0.1:0", {"model": service}) as server:
        client = ModelServiceClient(server.address, timeout_s=10.0)
        try:
            assert (await client.generate(_chat("t"))).model_version == "sim-1"
            reply = await client.update_weights(
                model_pb2.UpdateWeightsRequest(version="step-7", replicas=2, checkpoint="/ckpt/7")
            )
            assert (reply.previous_version, reply.version) == ("sim-1", "step-7")
            assert len(reply.replicas) == 2 and reply.retired == ["simulated/sim-1/0"]
            response = await client.generate(_chat("t"))
            assert response.model_version == "step-7" and response.replica in reply.replicas
            listed = await client.list_replicas(model_pb2.ListReplicasRequest())
            assert [(r.version, r.state, r.healthy) for r in listed.replicas] == [
                ("step-7", "active", True),
                ("step-7", "active", True),
            ]
            models = await client.list_models(model_pb2.ListModelsRequest())
            assert [(m.name, m.version) for m in models.models] == [("simulated", "step-7")]
            # The new replicas inherit the old ones' simulated GPU shape.
            new_backend = service.replicas()[0].backend
            assert isinstance(new_backend, SimulatedBackend)
            assert new_backend.latency.config == FAST and new_backend.version == "step-7"
            with pytest.raises(InvalidRequestError, match="version is required"):
                await client.update_weights(model_pb2.UpdateWeightsRequest())
        finally:
            await client.close()
            await service.stop()
