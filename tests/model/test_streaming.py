"""Incremental streaming: the Model Service's `GenerateStream`, the gateway's SSE, the
OpenAI-compatible upstream's SSE, and the gRPC client.

Ordering, not wall-clock: a recording backend and the client append to one event list
on one event loop, so "the first content chunk arrived before the model produced its
last token" is a comparison of positions in that list.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from megaflow.agent import tools
from megaflow.core.errors import ModelUnavailableError
from megaflow.model.gateway import TASK_HEADER, Gateway
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig
from megaflow.model.openai_messages import tool_to_openai
from megaflow.model.resilience import RetryPolicy
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.clients import ModelServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2

pytestmark = pytest.mark.integration

TASK = generate_tasks(1, seed=5)[0]
# 20 ms per decoded token, no prefill: an answer of ~30 tokens takes ~0.6 s to produce.
SLOW = LatencyConfig(slots=8, prefill_s_per_token=0.0, decode_s_per_token=0.02)


def _opening() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You fix bugs."},
        {"role": "user", "content": TASK.problem_statement},
    ]


def _tools() -> list[dict[str, Any]]:
    return [tool_to_openai(s) for s in tools.tool_specs()]


class RecordingBackend(SimulatedBackend):
    """A simulated backend that logs each chunk it produces into a shared event list."""

    def __init__(self, events: list[tuple[str, Any]], config: LatencyConfig, **kw: Any) -> None:
        super().__init__(name="sim", version="sim-3", latency=GpuLatencyModel(config), **kw)
        self.events = events

    async def generate_stream(
        self, request: model_pb2.GenerateRequest
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        async for chunk in super().generate_stream(request):
            self.events.append(("produced-last" if chunk.HasField("final") else "produced", chunk))
            yield chunk


async def _gateway(backend: SimulatedBackend) -> tuple[ModelServiceImpl, Gateway]:
    service = ModelServiceImpl([backend])
    gateway = Gateway(service)
    await gateway.start()
    return service, gateway


async def _until(predicate: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


async def test_first_chunk_arrives_before_the_model_has_finished() -> None:
    events: list[tuple[str, Any]] = []
    service, gateway = await _gateway(RecordingBackend(events, SLOW))
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="sim", messages=_opening(), tools=_tools(), stream=True
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    events.append(("received", choice.delta.content))
        kinds = [kind for kind, _ in events]
        assert kinds.count("produced-last") == 1
        first_received = kinds.index("received")
        assert first_received < kinds.index("produced-last")  # before the model finished
        # and the content came in several pieces, as the tokens were produced
        assert kinds[: kinds.index("produced-last")].count("received") >= 3
    finally:
        await client.close()
        await gateway.stop()
        await service.stop()


async def _plain_and_streamed(
    gateway: Gateway, path: str, body: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    headers = {TASK_HEADER: TASK.task_id}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(gateway.base_url + path, json=body) as resp:
            assert resp.status == 200
            plain = await resp.json()
        async with session.post(gateway.base_url + path, json={**body, "stream": True}) as resp:
            assert resp.status == 200
            raw = await resp.text()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return plain, [json.loads(e) for e in events[:-1]]


async def test_streamed_and_plain_answers_and_recordings_are_equal() -> None:
    config = LatencyConfig(slots=8, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    service, gateway = await _gateway(RecordingBackend([], config))
    try:
        body = {
            "model": "sim",
            "messages": _opening(),
            "tools": _tools(),
            "logprobs": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        body_plain = {k: v for k, v in body.items() if k != "stream_options"}
        plain, _ = await _plain_and_streamed(gateway, "/chat/completions", body_plain)
        plain_turn = gateway.pop_trajectory(TASK.task_id)
        _, chunks = await _plain_and_streamed(gateway, "/chat/completions", body)
        streamed_turn = gateway.pop_trajectory(TASK.task_id)
        # the second call's recording is the streamed one (the plain one was popped)
        assert plain_turn is not None and streamed_turn is not None
        assert len(streamed_turn.turns) == 2  # plain + streamed calls of the second round
        a, b = plain_turn.turns[0], streamed_turn.turns[1]
        for field in (
            "response",
            "model_version",
            "prompt_tokens",
            "completion_tokens",
            "prompt_token_ids",
            "completion_token_ids",
            "completion_logprobs",
            "replica",
        ):
            assert getattr(a, field) == getattr(b, field), field
        choices = [c for chunk in chunks for c in chunk["choices"]]
        content = "".join(c["delta"].get("content") or "" for c in choices)
        calls = [t for c in choices for t in c["delta"].get("tool_calls") or []]
        message = plain["choices"][0]["message"]
        assert content == message["content"]
        assert [(t["id"], t["function"]) for t in calls] == [
            (t["id"], t["function"]) for t in message["tool_calls"]
        ]
        assert [i for c in choices for i in c.get("token_ids", [])] == plain["choices"][0][
            "token_ids"
        ]
        streamed_lp = [e for c in choices for e in (c.get("logprobs") or {}).get("content", [])]
        assert streamed_lp == plain["choices"][0]["logprobs"]["content"]
        assert choices[-1]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert chunks[-1]["usage"] == plain["usage"]
        assert chunks[-1]["system_fingerprint"] == plain["system_fingerprint"] == "sim-3"
        # text completions too
        text_body = {"model": "sim", "prompt": TASK.problem_statement}
        plain_text, text_chunks = await _plain_and_streamed(gateway, "/completions", text_body)
        streamed_text = "".join(c["text"] for chunk in text_chunks for c in chunk["choices"])
        assert streamed_text == plain_text["choices"][0]["text"]
    finally:
        await gateway.stop()
        await service.stop()


async def test_a_client_that_leaves_mid_stream_stops_the_generation() -> None:
    events: list[tuple[str, Any]] = []
    backend = RecordingBackend(events, SLOW)
    service, gateway = await _gateway(backend)
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="sim", messages=_opening(), tools=_tools(), stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first piece of content: leave
        await stream.close()
        await _until(lambda: backend.latency.in_flight == 0, "the generation was not stopped")
        await _until(lambda: gateway.in_flight == 0, "the gateway still counts the call")
        assert "produced-last" not in [kind for kind, _ in events]
        assert all(r.in_flight == 0 for r in service.replicas())
    finally:
        await client.close()
        await gateway.stop()
        await service.stop()


# -- an OpenAI-compatible upstream that streams (and fails) on demand ----------------------


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _delta(content: str, ids: list[int]) -> dict[str, Any]:
    return {
        "choices": [
            {
                "index": 0,
                "delta": {"content": content},
                "token_ids": ids,
                "logprobs": {"content": [{"token": f"token_id:{i}", "logprob": -0.5} for i in ids]},
                "finish_reason": None,
            }
        ]
    }


PIECES = ["Hello", ", ", "world", "!"]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[str]]]:
    """`/{mode}/v1/chat/completions`: `ok` streams PIECES; `fail-once` answers 500 to
    its first call; `break` sends two pieces, then an error event; `drop` sends two
    pieces, then closes the connection."""
    calls: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        body = await request.json()
        assert body["stream"] is True
        calls.append(mode)
        if mode == "fail-once" and calls.count(mode) == 1:
            return web.json_response({"error": {"message": "overloaded"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        for i, piece in enumerate(PIECES):
            if i == 2 and mode == "break":
                await resp.write(_sse({"error": {"message": "upstream fell over"}}))
                return resp
            if i == 2 and mode == "drop":
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(_sse(_delta(piece, [100 + i])))
            await asyncio.sleep(0.01)
        await resp.write(_sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
        await resp.write(_sse({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/{mode}/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", calls
    finally:
        await runner.cleanup()


def _upstream_backend(base: str, mode: str) -> OpenAIBackend:
    return OpenAIBackend(
        OpenAIBackendConfig(
            base_url=f"{base}/{mode}",
            model="up",
            name="up",
            request_timeout_s=10.0,
            retry=RetryPolicy(max_retries=3, base_backoff_s=0.01, max_backoff_s=0.05),
        )
    )


WithGateway = Callable[[str], Awaitable[tuple[OpenAIBackend, ModelServiceImpl, Gateway]]]


@pytest.fixture
async def upstream_gateway(
    upstream: tuple[str, list[str]],
) -> AsyncIterator[WithGateway]:
    made: list[tuple[OpenAIBackend, ModelServiceImpl, Gateway]] = []

    async def make(mode: str) -> tuple[OpenAIBackend, ModelServiceImpl, Gateway]:
        backend = _upstream_backend(upstream[0], mode)
        service = ModelServiceImpl([backend])
        gateway = Gateway(service)
        await gateway.start()
        made.append((backend, service, gateway))
        return made[-1]

    yield make
    for _, service, gateway in made:
        await gateway.stop()
        await service.stop()


async def _stream_text(gateway: Gateway) -> tuple[str, Any]:
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    text, usage = "", None
    try:
        stream = await client.chat.completions.create(
            model="up",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
    except openai.APIError as error:
        error.add_note(f"text so far: {text!r}")
        raise
    finally:
        await client.close()
    return text, usage


async def test_upstream_streams_through_the_gateway(
    upstream: tuple[str, list[str]], upstream_gateway: WithGateway
) -> None:
    backend, _, gateway = await upstream_gateway("ok")
    text, usage = await _stream_text(gateway)
    assert text == "".join(PIECES) and usage.total_tokens == 11
    service_chunks = [
        c
        async for c in backend.generate_stream(
            model_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content="x")])
        )
    ]
    assert [c.text for c in service_chunks[:-1]] == PIECES
    final = service_chunks[-1].final
    assert list(final.completion_token_ids) == [100, 101, 102, 103]
    assert list(final.completion_logprobs) == [-0.5] * 4
    assert (final.message.content, final.finish_reason) == ("".join(PIECES), "stop")


async def test_an_upstream_failure_before_the_first_token_is_retried(
    upstream: tuple[str, list[str]], upstream_gateway: WithGateway
) -> None:
    backend, _, gateway = await upstream_gateway("fail-once")
    text, _ = await _stream_text(gateway)
    assert text == "".join(PIECES)
    assert upstream[1] == ["fail-once", "fail-once"]
    assert backend.retry_stats()["recovered_calls"] == 1


@pytest.mark.parametrize("mode", ["break", "drop"])
async def test_an_upstream_failure_after_the_first_token_ends_the_stream(
    upstream: tuple[str, list[str]], upstream_gateway: WithGateway, mode: str
) -> None:
    backend, service, gateway = await upstream_gateway(mode)
    with pytest.raises(openai.APIError, match="after the stream began") as caught:
        await _stream_text(gateway)
    assert "text so far: 'Hello, '" in str(caught.value.__notes__)
    assert upstream[1] == [mode]  # no retry: it would repeat "Hello, "
    assert backend.retry_stats()["retries"] == 0
    (replica,) = service.replicas()
    assert replica.info().failures == 1  # it still counts against the replica
    assert gateway.in_flight == 0


# -- over gRPC ----------------------------------------------------------------------------


async def test_generate_stream_over_grpc() -> None:
    events: list[tuple[str, Any]] = []
    backend = RecordingBackend(events, SLOW)
    service = ModelServiceImpl([backend])
    request = model_pb2.GenerateRequest(
        task_id=TASK.task_id,
        messages=[
            common_pb2.ChatMessage(role="system", content="You fix bugs."),
            common_pb2.ChatMessage(role="user", content=TASK.problem_statement),
        ],
        tools=tools.tool_specs(),
    )
    async with GrpcServer("127.0.0.1:0", {"model": service}) as server:
        client = ModelServiceClient(server.address, timeout_s=20.0)
        try:
            plain = await client.generate(request)
            chunks = []
            async for chunk in client.generate_stream(request):
                events.append(("received", chunk))
                chunks.append(chunk)
            kinds = [k for k, _ in events]
            last = len(kinds) - 1 - kinds[::-1].index("produced-last")
            first_received = kinds.index("received")
            assert first_received < last  # a chunk arrived before the model finished
            final = chunks[-1].final
            assert final.message == plain.message
            assert "".join(c.text for c in chunks) == plain.message.content
            ids = [i for c in chunks for i in c.token_ids]
            assert ids == list(plain.completion_token_ids) == list(final.completion_token_ids)
            assert final.model_version == "sim-3" and final.replica == plain.replica
            # leaving mid-stream cancels the generation on the server
            events.clear()
            stream = client.generate_stream(request)
            await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
            await _until(lambda: backend.latency.in_flight == 0, "generation kept running")
            assert "produced-last" not in [k for k, _ in events]
            # an error before the first chunk is the service's error
            bad = model_pb2.GenerateRequest(model="nope", messages=request.messages)
            with pytest.raises(Exception, match="no model named"):
                async for _ in client.generate_stream(bad):
                    pass
        finally:
            await client.close()
    await service.stop()


async def test_service_stream_failover_before_first_chunk() -> None:
    """A replica whose stream fails before its first chunk: the call goes to another."""

    class Broken(SimulatedBackend):
        async def generate_stream(
            self, request: model_pb2.GenerateRequest
        ) -> AsyncIterator[model_pb2.GenerateChunk]:
            raise ModelUnavailableError("broken replica")
            yield model_pb2.GenerateChunk()  # pragma: no cover (makes it a generator)

    service = ModelServiceImpl([Broken.fast(name="m", version="v")])
    service.add_replica(SimulatedBackend.fast(name="m", version="v"))
    request = model_pb2.GenerateRequest(
        model="m", messages=[common_pb2.ChatMessage(role="user", content="hello")]
    )
    try:
        for _ in range(3):
            chunks = [c async for c in service.generate_stream(request)]
            assert chunks[-1].final.replica.endswith("/1")
    finally:
        await service.stop()


async def test_a_model_service_without_streaming_is_streamed_whole() -> None:
    """A Model Service with no `generate_stream` (an older one, a wrapper): the gateway
    still answers `stream: true`, with the whole answer as one content chunk."""

    class PlainOnly:
        def __init__(self, inner: ModelServiceImpl) -> None:
            self.inner = inner

        async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
            return await self.inner.generate(request)

    inner = ModelServiceImpl([SimulatedBackend.fast(name="sim", version="v")])
    gateway = Gateway(PlainOnly(inner))  # type: ignore[arg-type]
    await gateway.start()
    try:
        body = {"model": "sim", "messages": _opening(), "tools": _tools()}
        plain, chunks = await _plain_and_streamed(gateway, "/chat/completions", body)
        contents = [c["delta"]["content"] for ch in chunks for c in ch["choices"]
                    if c["delta"].get("content")]  # fmt: skip
        assert contents == [plain["choices"][0]["message"]["content"]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        await gateway.stop()
        await inner.stop()
