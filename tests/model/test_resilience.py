"""Per-call resilience: retry policy, Retry-After, call budget, circuit breaker, failover.

The state machines are tested with an injected clock and a recorded sleep (no
wall-clock asserts); the retries against a scripted aiohttp upstream (statuses and
headers that llm-katan cannot send), and a whole run against the real llm-katan
failing 30% of chat calls with HTTP 500.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from megaflow.core.errors import InvalidRequestError, ModelUnavailableError
from megaflow.model.admission import ModelServiceConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig
from megaflow.model.replicas import HealthConfig
from megaflow.model.resilience import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    backoff_delay,
    call_scope,
    current_call,
    parse_retry_after,
)
from megaflow.model.service import ModelServiceImpl
from megaflow.testing.llm_katan import LlmKatanServer, free_port
from megaflow.v1 import common_pb2, model_pb2

_OK = {
    "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}


def _chat(task_id: str = "t-1") -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        task_id=task_id, messages=[common_pb2.ChatMessage(role="user", content="hello")]
    )


# -- pure policy -------------------------------------------------------------------------------


def test_full_jitter_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(base_backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(7)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (40, 1.0)]:
        draws = [backoff_delay(policy, retry, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # full jitter spans the whole range
        assert min(draws) < ceiling * 0.2


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7.0)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_call_scope_keeps_the_earlier_deadline() -> None:
    assert current_call().deadline is None and not current_call().failover
    with call_scope(100.0, failover=True):
        assert (current_call().deadline, current_call().failover) == (100.0, True)
        with call_scope(200.0):
            assert current_call().deadline == 100.0  # an inner scope cannot widen it
            assert not current_call().failover
        with call_scope(50.0):
            assert current_call().deadline == 50.0
    assert current_call().deadline is None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_state_machine() -> None:
    clock = _Clock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=10.0), clock)
    assert breaker.state is BreakerState.CLOSED and breaker.available()
    assert not breaker.failure() and not breaker.failure()
    breaker.success()  # a success resets the count
    assert not breaker.failure() and not breaker.failure()
    assert breaker.failure()  # third in a row: open
    assert breaker.state is BreakerState.OPEN and not breaker.available()
    assert not breaker.acquire() and breaker.rejected == 1
    clock.now = 9.9
    assert breaker.state is BreakerState.OPEN
    clock.now = 10.0  # cool-down over: one trial call
    assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    assert breaker.acquire()
    assert not breaker.available() and not breaker.acquire()  # one trial at a time
    assert breaker.failure()  # the trial failed: open again, for a new cool-down
    assert breaker.state is BreakerState.OPEN and breaker.opened == 2
    clock.now = 19.9
    assert breaker.state is BreakerState.OPEN
    clock.now = 20.0
    assert breaker.acquire()
    breaker.release()  # the trial ended without an answer (cancelled, invalid)
    assert breaker.available() and breaker.acquire()
    breaker.success()  # the trial succeeded: closed
    assert breaker.state is BreakerState.CLOSED and breaker.available()
    assert not breaker.failure()  # counting starts again from zero


# -- a scripted upstream --------------------------------------------------------------------------


class Script:
    """The answers of a scripted upstream, per path prefix: popped in order, then "ok"."""

    def __init__(self) -> None:
        self.plans: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.seen: dict[str, int] = {}


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, Script]]:
    script = Script()

    async def chat(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        script.seen[name] = script.seen.get(name, 0) + 1
        plan = script.plans.get(name, [])
        if name.startswith("dead"):
            return web.json_response({"error": {"message": f"{name} is down"}}, status=500)
        if plan:
            status, headers = plan.pop(0)
            body = {"error": {"message": f"scripted {status}"}}
            return web.json_response(body, status=status, headers=headers)
        return web.json_response(_OK)

    async def models(request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_post("/{name}/v1/chat/completions", chat)
    app.router.add_get("/{name}/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", script
    finally:
        await runner.cleanup()


class Recorder:
    """The backend's sleep: records each wait and moves the backend's clock on by it."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.offset = 0.0

    async def __call__(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.offset += delay

    def clock(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def backends() -> AsyncIterator[list[OpenAIBackend]]:
    made: list[OpenAIBackend] = []
    yield made
    for backend in made:
        await backend.close()


def _backend(
    made: list[OpenAIBackend], url: str, *, name: str = "m", **kwargs: Any
) -> tuple[OpenAIBackend, Recorder]:
    kwargs.setdefault("retry", RetryPolicy(max_retries=4, base_backoff_s=0.01, max_backoff_s=2))
    backend = OpenAIBackend(OpenAIBackendConfig(base_url=url, model="m", name=name, **kwargs))
    recorder = Recorder()
    backend._sleep = recorder
    backend._clock = recorder.clock
    made.append(backend)
    return backend, recorder


async def test_retryable_statuses_are_retried_until_an_answer(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, script = upstream
    script.plans["a"] = [(500, {}), (502, {}), (503, {}), (504, {})]
    backend, recorder = _backend(backends, f"{base}/a")
    response = await backend.generate(_chat())
    assert response.message.content == "hi"
    assert script.seen["a"] == 5 and len(recorder.sleeps) == 4
    assert all(0.0 <= d <= 2.0 for d in recorder.sleeps)
    stats = backend.retry_stats()
    assert (stats["retries"], stats["retried_calls"], stats["recovered_calls"]) == (4, 1, 1)
    assert backend.failures == 0


async def test_retries_run_out_with_the_last_error(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, script = upstream
    backend, recorder = _backend(
        backends, f"{base}/dead", retry=RetryPolicy(max_retries=2, base_backoff_s=0.01)
    )
    with pytest.raises(ModelUnavailableError, match="HTTP 500: dead is down"):
        await backend.generate(_chat())
    assert script.seen["dead"] == 3 and len(recorder.sleeps) == 2
    assert backend.retry_stats()["gave_up_calls"] == 1 and backend.failures == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_final_statuses_are_not_retried(
    upstream: tuple[str, Script], backends: list[OpenAIBackend], status: int
) -> None:
    base, script = upstream
    name = f"final{status}"
    script.plans[name] = [(status, {})]
    backend, recorder = _backend(backends, f"{base}/{name}")
    with pytest.raises(InvalidRequestError, match=rf"HTTP {status}\): scripted {status}"):
        await backend.generate(_chat())
    assert script.seen[name] == 1 and recorder.sleeps == []


async def test_retry_after_is_honoured(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, script = upstream
    date = email.utils.formatdate(time.time() + 1.5, usegmt=True)
    script.plans["ra"] = [(429, {"Retry-After": "1.25"}), (503, {"Retry-After": date})]
    backend, recorder = _backend(backends, f"{base}/ra")
    assert (await backend.generate(_chat())).message.content == "hi"
    assert recorder.sleeps[0] >= 1.25  # at least what the server asked, seconds
    assert 0.5 < recorder.sleeps[1] <= 2.0  # an HTTP date
    # A wait longer than the policy's largest backoff is not made: the error goes back.
    script.plans["ra"] = [(429, {"Retry-After": "3600"})]
    with pytest.raises(ModelUnavailableError, match="HTTP 429"):
        await backend.generate(_chat())
    assert len(recorder.sleeps) == 2


async def test_retries_stay_inside_the_call_deadline(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, script = upstream
    policy = RetryPolicy(max_retries=50, base_backoff_s=0.2, max_backoff_s=0.2)
    backend, recorder = _backend(backends, f"{base}/dead", retry=policy, call_timeout_s=0.5)
    with pytest.raises(ModelUnavailableError):
        await backend.generate(_chat())
    # The sleeps move the backend's clock, not time: retries stop once the next wait
    # would end past the budget.
    assert sum(recorder.sleeps) < 0.5 and script.seen["dead"] < 50
    # The Model Service's deadline (call_scope) bounds them the same way.
    backend2, recorder2 = _backend(backends, f"{base}/dead", retry=policy)
    with call_scope(time.monotonic() + 0.5), pytest.raises(ModelUnavailableError):
        await backend2.generate(_chat())
    assert sum(recorder2.sleeps) < 0.5


async def test_a_failed_attempt_is_handed_over_when_another_replica_can_take_it(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, script = upstream
    backend, recorder = _backend(backends, f"{base}/dead")
    with call_scope(None, failover=True), pytest.raises(ModelUnavailableError):
        await backend.generate(_chat())
    assert script.seen["dead"] == 1 and recorder.sleeps == []
    assert backend.retry_stats()["handed_to_another_replica"] == 1


async def test_connection_refused_is_retried(backends: list[OpenAIBackend]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend, recorder = _backend(backends, url, retry=RetryPolicy(max_retries=2))
    with pytest.raises(ModelUnavailableError, match="cannot connect"):
        await backend.generate(_chat())
    assert len(recorder.sleeps) == 2


async def test_breaker_opens_and_calls_fail_over_to_the_healthy_replica(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, script = upstream
    health = HealthConfig(
        unhealthy_after=1000, breaker=BreakerConfig(failure_threshold=2, cooldown_s=3600)
    )
    config = ModelServiceConfig(health=health, sticky=False, route_policy="round_robin")
    bad, bad_sleeps = _backend(backends, f"{base}/dead")
    good, _ = _backend(backends, f"{base}/good")
    service = ModelServiceImpl([bad], config=config)
    service.add_replica(good)
    try:
        for i in range(12):
            response = await service.generate(_chat(f"t-{i}"))
            assert response.message.content == "hi"
        bad_replica, good_replica = service.replicas()
        # The bad replica was tried until its breaker opened, then skipped.
        assert bad_replica.breaker.state is BreakerState.OPEN
        assert script.seen["dead"] == 2 and bad_sleeps.sleeps == []  # handed over at once
        assert good_replica.breaker.state is BreakerState.CLOSED
        assert script.seen["good"] == 12
        assert bad.retry_stats()["handed_to_another_replica"] == 2
    finally:
        await service.stop()


# -- a whole run against llm-katan failing 30% of chat calls ---------------------------------


@pytest.fixture(scope="module")
def flaky_katan() -> Iterator[LlmKatanServer]:
    with LlmKatanServer(model="katan-flaky30", error_rate=0.3) as server:
        yield server


@pytest.mark.integration
def test_a_run_against_a_server_failing_30_percent_loses_no_task(
    flaky_katan: LlmKatanServer, tmp_path: Path
) -> None:
    """llm-katan's echo answers every turn with a call of the first tool (bash) and dummy
    arguments, so no task ever submits: every task that gets through its model calls
    ends at its step limit, "failed" by the task's fault with reward 0 (scored). What
    the server's 500s must not do is end a task without a result (infra), or score one
    0 for the server's failure."""
    import megaflow
    from megaflow.tasks.swe_synth import generate_tasks

    backend = OpenAIBackend(
        OpenAIBackendConfig(
            base_url=flaky_katan.base_url, model=flaky_katan.model, api_key=flaky_katan.api_key
        )
    )
    tasks = generate_tasks(24, seed=3)
    results = megaflow.run(tasks, model=backend, concurrency=8, sandbox_dir=tmp_path / "sb")
    assert len(results) == 24
    scored = [r for r in results if r.reward is not None]
    for r in results:
        if r.reward == 0.0:  # a zero is the task's own failure, never the server's
            assert r.error_kind == "task" and "step limit" in r.error, r
        if r.reward is None:
            assert r.error_kind == "infra", r
    assert len(scored) >= 22, [(r.error_kind, r.error) for r in results if r.reward is None]
    stats = backend.retry_stats()
    assert stats["retries"] > 0 and stats["recovered_calls"] > 0, stats
    # ~30% of several hundred calls failed once or more; almost all were recovered.
    assert stats["gave_up_calls"] <= stats["recovered_calls"] // 10 + 2, stats


async def test_a_replica_added_with_a_wrong_model_name_is_refused_at_once(
    upstream: tuple[str, Script], backends: list[OpenAIBackend]
) -> None:
    base, _ = upstream
    good, _ = _backend(backends, f"{base}/good")
    service = ModelServiceImpl([good], config=ModelServiceConfig(warm_timeout_s=60))
    wrong = OpenAIBackend(OpenAIBackendConfig(base_url=f"{base}/good", model="nope", name="m"))
    backends.append(wrong)
    try:
        with pytest.raises(
            InvalidRequestError, match="does not serve model 'nope'; it serves: 'm'"
        ):
            await service.deploy_version("m", "v2", [wrong])  # not a 60 s warm-up timeout
        assert [r.backend for r in service.replicas()] == [good]
    finally:
        await service.stop()


@pytest.mark.integration
async def test_failover_between_two_real_upstreams() -> None:
    """Two llm-katan replicas, one failing every chat with HTTP 500: every request is
    answered (by the other), the failing one's breaker opens after its threshold, and
    it is then skipped."""
    health = HealthConfig(breaker=BreakerConfig(failure_threshold=3, cooldown_s=3600))
    config = ModelServiceConfig(health=health, route_policy="round_robin", sticky=False)
    async with (
        LlmKatanServer(model="katan-down", error_rate=1.0) as down,
        LlmKatanServer(model="katan-up") as up,
    ):

        def backend(server: LlmKatanServer) -> OpenAIBackend:
            return OpenAIBackend(
                OpenAIBackendConfig(
                    base_url=server.base_url,
                    model=server.model,
                    name="m",
                    api_key=server.api_key,
                )
            )

        bad, good = backend(down), backend(up)
        service = ModelServiceImpl([bad], config=config)
        service.add_replica(good)
        try:
            answers = [await service.generate(_chat(f"t-{i}")) for i in range(20)]
            assert all("[echo] model=katan-up" in a.message.content for a in answers)
            bad_replica = service.replicas()[0]
            assert bad_replica.breaker.state is BreakerState.OPEN
            assert bad.stats().requests == 3  # then skipped: the breaker is open
            assert bad.retry_stats()["handed_to_another_replica"] == 3
            assert good.stats().requests == 20 and good.failures == 0
        finally:
            await service.stop()


async def test_check_upstream_names_each_cause(upstream: tuple[str, Script]) -> None:
    from megaflow.model.openai import check_upstream

    base, _ = upstream
    assert await check_upstream(f"{base}/good", "m", api_key="k") == ["m"]
    assert await check_upstream(f"{base}/good", "", api_key="k") == ["m"]  # any model
    with pytest.raises(InvalidRequestError, match="does not serve model 'x'; it serves: 'm'"):
        await check_upstream(f"{base}/good", "x", api_key="k")
    with pytest.raises(InvalidRequestError, match=r"does not exist \(HTTP 404\)"):
        await check_upstream(f"{base}/a/b", "m", api_key="k")  # not an API root
    port = free_port()
    with pytest.raises(InvalidRequestError, match=f"127.0.0.1:{port}/v1 is unreachable"):
        await check_upstream(f"http://127.0.0.1:{port}", "m", api_key="k")
    assert await check_upstream(f"http://127.0.0.1:{port}", "m", allow_unreachable=True) == []


def test_megaflow_run_checks_the_server_before_any_task(tmp_path: Path) -> None:
    import megaflow

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InvalidRequestError, match="is unreachable"):
        megaflow.run(
            [megaflow.Task(task_id="t", problem_statement="p", eval_command="true")],
            model=f"openai:{url}#m",
            sandbox_dir=tmp_path / "sb",
        )
    assert not (tmp_path / "sb").exists() or not any((tmp_path / "sb").iterdir())
