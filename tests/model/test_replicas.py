"""Replicas behind one model name: routing, retries, health, backpressure, rate limits.

The unit tests use simulated replicas (and, as a replica that really fails, an OpenAI
backend pointed at a port nobody listens on); the integration tests use real
`llm-katan` servers with fault injection.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from megaflow.core.errors import (
    CapacityError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelUnavailableError,
)
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig
from megaflow.model.ratelimit import RateLimitConfig, RateLimiter
from megaflow.model.replicas import HealthConfig
from megaflow.model.resilience import RetryPolicy
from megaflow.model.service import ModelServiceConfig, ModelServiceImpl, client_key
from megaflow.testing.llm_katan import LlmKatanServer, free_port
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2


def _chat(
    task_id: str = "t-1", text: str = "fix the bug", **kwargs: Any
) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        task_id=task_id, messages=[common_pb2.ChatMessage(role="user", content=text)], **kwargs
    )


def _sim(version: str = "sim-1", time_scale: float = 0.0, slots: int = 64) -> SimulatedBackend:
    latency = GpuLatencyModel(LatencyConfig(slots=slots, overhead_s=1.0, time_scale=time_scale))
    return SimulatedBackend(version=version, latency=latency)


@pytest.fixture
async def closing() -> AsyncIterator[list[ModelServiceImpl]]:
    services: list[ModelServiceImpl] = []
    yield services
    for service in services:
        await service.stop()


# --------------------------------------------------------------------------- unit


async def test_a_backend_list_still_makes_one_replica_per_model(
    closing: list[ModelServiceImpl],
) -> None:
    service = ModelServiceImpl([_sim()])
    closing.append(service)
    response = await service.generate(_chat())
    assert response.replica == "simulated/sim-1/0" and response.model_version == "sim-1"
    assert [m.name for m in (await service.list_models(model_pb2.ListModelsRequest())).models] == [
        "simulated"
    ]


async def test_least_loaded_spreads_concurrent_requests(closing: list[ModelServiceImpl]) -> None:
    service = ModelServiceImpl([_sim(time_scale=0.05)])
    closing.append(service)
    service.add_replica(_sim(time_scale=0.05))
    responses = await asyncio.gather(*(service.generate(_chat(f"t{i}")) for i in range(20)))
    counts = Counter(r.replica for r in responses)
    assert set(counts) == {"simulated/sim-1/0", "simulated/sim-1/1"}
    assert min(counts.values()) >= 8


async def test_a_tasks_turns_stick_to_one_replica(closing: list[ModelServiceImpl]) -> None:
    service = ModelServiceImpl([_sim()])
    closing.append(service)
    for _ in range(3):
        service.add_replica(_sim())
    served = {
        task: {(await service.generate(_chat(task))).replica for _ in range(5)}
        for task in ("a", "b", "c", "d")
    }
    assert all(len(replicas) == 1 for replicas in served.values())
    assert len(set().union(*served.values())) == 4  # and the tasks were spread


async def test_retryable_failure_goes_to_another_replica(closing: list[ModelServiceImpl]) -> None:
    dead = OpenAIBackend(
        OpenAIBackendConfig(
            base_url=f"http://127.0.0.1:{free_port()}",
            model="m",
            name="simulated",
            request_timeout_s=2.0,
        )
    )
    config = ModelServiceConfig(route_policy="round_robin", health=HealthConfig(interval_s=60))
    service = ModelServiceImpl([dead], config=config)
    closing.append(service)
    service.add_replica(_sim())
    responses = [await service.generate(_chat(f"t{i}")) for i in range(10)]
    assert {r.replica for r in responses} == {"simulated/sim-1/1"}
    dead_replica = service.replicas()[0]
    assert dead_replica.failures >= 3 and not dead_replica.healthy  # taken out of rotation
    await service.check_health()
    assert not dead_replica.healthy  # the probe fails too


async def test_when_every_replica_fails_the_error_goes_back_to_the_caller(
    closing: list[ModelServiceImpl],
) -> None:
    def dead() -> OpenAIBackend:
        url = f"http://127.0.0.1:{free_port()}"
        # no in-place retries: the replica-level failover alone is under test
        config = OpenAIBackendConfig(
            base_url=url, model="m", name="m", retry=RetryPolicy(max_retries=0)
        )
        return OpenAIBackend(config)

    once = ModelServiceImpl([dead()], config=ModelServiceConfig(retry_backoff_s=0.01))
    closing.append(once)
    once.add_replica(dead())
    with pytest.raises(ModelUnavailableError, match="cannot connect") as caught:
        await once.generate(_chat())
    assert caught.value.retryable  # the agent or scheduler retries: never a reward of 0
    assert [r.failures for r in once.replicas()] == [1, 1]  # each replica tried once
    twice = ModelServiceImpl([dead()], config=ModelServiceConfig(retry_rounds=2))
    closing.append(twice)
    with pytest.raises(ModelUnavailableError):
        await twice.generate(_chat())
    assert twice.replicas()[0].failures == 2


async def test_saturated_replicas_queue_then_refuse(closing: list[ModelServiceImpl]) -> None:
    config = ModelServiceConfig(replica_capacity=1, max_queue=2)
    service = ModelServiceImpl([_sim(time_scale=0.2)], config=config)
    closing.append(service)
    service.add_replica(_sim(time_scale=0.2))
    running = [asyncio.create_task(service.generate(_chat(f"t{i}"))) for i in range(4)]
    await asyncio.sleep(0.05)
    assert service.stats()["simulated"].queued == 2  # two run, two wait
    with pytest.raises(CapacityError, match="saturated"):
        await service.generate(_chat("t-late"))
    responses = await asyncio.gather(*running)  # the queued ones are served, not dropped
    assert len(responses) == 4


async def test_nothing_waits_past_the_deadline(closing: list[ModelServiceImpl]) -> None:
    config = ModelServiceConfig(replica_capacity=1, deadline_s=0.2)
    service = ModelServiceImpl([_sim(time_scale=2.0)], config=config)
    closing.append(service)
    first = asyncio.create_task(service.generate(_chat("t0")))
    await asyncio.sleep(0.05)
    # The second waits for capacity, which frees only when the first runs out of time.
    with pytest.raises((CapacityError, DeadlineExceededError)) as caught:
        await service.generate(_chat("t1"))
    assert caught.value.retryable
    with pytest.raises(DeadlineExceededError, match=r"no answer within 0\.2s"):
        await first
    assert service.stats()["simulated"].queued == 0


def test_rate_limiter_token_buckets() -> None:
    limiter = RateLimiter(RateLimitConfig(requests_per_min=60, tokens_per_min=600, burst_s=2))
    # 1 request/s and 10 tokens/s, two seconds deep: two requests now, the third waits 1 s.
    assert limiter.reserve("a", 5, now=0.0, max_wait_s=0) == 0.0
    assert limiter.reserve("a", 5, now=0.0, max_wait_s=0) == 0.0
    assert limiter.reserve("a", 5, now=0.0, max_wait_s=0.5) is None  # rejected, not consumed
    assert limiter.reserve("a", 5, now=0.0, max_wait_s=5) == pytest.approx(1.0)
    assert limiter.reserve("b", 5, now=0.0, max_wait_s=0) == 0.0  # clients are separate
    assert limiter.reserve("a", 0, now=10.0, max_wait_s=0) == 0.0  # refilled
    limiter.charge("a", 40, now=10.0)  # a long completion, learnt afterwards
    assert limiter.reserve("a", 10, now=10.0, max_wait_s=10) == pytest.approx(3.0)
    # A request bigger than the bucket waits for a full bucket, not forever.
    assert limiter.reserve("c", 10_000, now=0.0, max_wait_s=0) == 0.0
    assert RateLimiter().reserve("x", 10**9, now=0.0, max_wait_s=0) == 0.0  # off by default


async def test_rate_limit_per_client_in_the_service(closing: list[ModelServiceImpl]) -> None:
    config = ModelServiceConfig(
        deadline_s=0.5, rate_limit=RateLimitConfig(requests_per_min=60, burst_s=1)
    )
    service = ModelServiceImpl([_sim()], config=config)
    closing.append(service)
    await service.generate(_chat("run-a/t1"))
    with pytest.raises(CapacityError, match="'run-a' is over its rate limit"):
        await service.generate(_chat("run-a/t2"))
    await service.generate(_chat("run-b/t1"))  # another client
    await service.generate(_chat("run-a/t3", client_id="explicit"))
    assert client_key(_chat("x:y")) == "x" and client_key(model_pb2.GenerateRequest()) == "default"


# --------------------------------------------------------------------------- integration


def _katan(**kwargs: Any) -> Iterator[LlmKatanServer]:
    server = LlmKatanServer(**kwargs).start_sync()
    try:
        yield server
    finally:
        server.stop_sync()


def _upstream(server: LlmKatanServer, **kwargs: Any) -> OpenAIBackend:
    config = {
        "base_url": server.base_url,
        "model": server.model,
        "api_key": server.api_key,
        "name": "katan",
        "request_timeout_s": 10.0,
        **kwargs,
    }
    return OpenAIBackend(OpenAIBackendConfig(**config))


async def _load(service: ModelServiceImpl, n: int, parallel: int, on_done: Any = None) -> list[Any]:
    gate = asyncio.Semaphore(parallel)
    results: list[Any] = []

    async def one(i: int) -> None:
        async with gate:
            try:
                results.append(await service.generate(_chat(f"t{i}", model="katan")))
            except Exception as error:  # counted as a failed request
                results.append(error)
            if on_done is not None:
                await on_done(len(results))

    await asyncio.gather(*(one(i) for i in range(n)))
    return results


@pytest.fixture
def flaky_server() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-flaky", error_rate=0.2)


@pytest.fixture
def good_server() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-good", latency_ms=20)


@pytest.fixture
def victim_server() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-victim", latency_ms=20)


@pytest.mark.integration
async def test_flaky_upstream_loses_no_request(
    flaky_server: LlmKatanServer, good_server: LlmKatanServer, closing: list[ModelServiceImpl]
) -> None:
    flaky, good = _upstream(flaky_server), _upstream(good_server)
    config = ModelServiceConfig(health=HealthConfig(interval_s=0.2), deadline_s=30)
    service = ModelServiceImpl([flaky], config=config)
    closing.append(service)
    service.add_replica(good)
    results = await _load(service, 200, parallel=20)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert flaky.failures > 0  # errors were injected, and retried elsewhere
    assert {r.replica for r in results} == {"katan/upstream/0", "katan/upstream/1"}
    assert all("[echo]" in r.message.content for r in results)


@pytest.mark.integration
async def test_killing_a_replica_mid_run_loses_no_request(
    victim_server: LlmKatanServer, good_server: LlmKatanServer, closing: list[ModelServiceImpl]
) -> None:
    config = ModelServiceConfig(health=HealthConfig(interval_s=0.2), deadline_s=30)
    service = ModelServiceImpl([_upstream(victim_server)], config=config)
    closing.append(service)
    service.add_replica(_upstream(good_server))
    victim = service.replicas()[0]
    pid = victim_server.pid
    assert pid is not None
    killed_at: list[int] = []

    async def kill_at_60(done: int) -> None:
        if done >= 60 and not killed_at:
            killed_at.append(done)
            os.killpg(pid, signal.SIGKILL)  # the whole server, without warning

    results = await _load(service, 200, parallel=20, on_done=kill_at_60)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert len(results) == 200 and killed_at
    assert {r.replica for r in results[: killed_at[0]]} == {"katan/upstream/0", "katan/upstream/1"}
    late = [r.replica for r in results[killed_at[0] + 25 :]]
    assert late and set(late) == {"katan/upstream/1"}
    assert not victim.healthy


@pytest.mark.integration
async def test_health_checks_bring_a_replica_back(closing: list[ModelServiceImpl]) -> None:
    port = free_port()
    config = ModelServiceConfig(health=HealthConfig(interval_s=60, healthy_after=2))
    server = LlmKatanServer(model="katan-late", port=port)
    service = ModelServiceImpl([_upstream(server)], config=config)
    closing.append(service)
    replica = service.replicas()[0]
    for _ in range(3):
        await service.check_health()
    assert not replica.healthy
    async with server:
        await service.check_health()
        assert not replica.healthy  # one success is not enough
        await service.check_health()
        assert replica.healthy
        response = await service.generate(_chat(model="katan"))
        assert response.replica == replica.id


@pytest.mark.integration
async def test_invalid_requests_are_not_retried(
    good_server: LlmKatanServer, closing: list[ModelServiceImpl]
) -> None:
    unauthorised = [_upstream(good_server, api_key=""), _upstream(good_server, api_key="")]
    service = ModelServiceImpl([unauthorised[0]])
    closing.append(service)
    service.add_replica(unauthorised[1])
    with pytest.raises(InvalidRequestError, match="401"):
        await service.generate(_chat(model="katan"))
    assert sum(b.failures for b in unauthorised) == 1  # tried once, on one replica
    assert all(r.healthy for r in service.replicas())
