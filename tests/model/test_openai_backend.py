"""`OpenAIBackend` against a real llm-katan server (echo backend) and tiny aiohttp fakes.

Deadline policy under test: a request that outlives `request_timeout_s` raises
`ModelUnavailableError` (retryable), not `DeadlineExceededError`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from megaflow.agent.tools import tool_specs
from megaflow.core.errors import InvalidRequestError, ModelUnavailableError
from megaflow.model.backend import ModelBackend
from megaflow.model.openai import (
    OpenAIBackend,
    OpenAIBackendConfig,
    list_upstream_models,
    normalise_base_url,
)
from megaflow.model.resilience import RetryPolicy
from megaflow.testing.llm_katan import LlmKatanError, LlmKatanServer, free_port
from megaflow.v1 import common_pb2, model_pb2

pytestmark = pytest.mark.integration

MakeBackend = Callable[..., OpenAIBackend]
NO_RETRY = RetryPolicy(max_retries=0)  # one attempt: these tests look at one failure


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _katan(**kwargs: Any) -> Iterator[LlmKatanServer]:
    server = LlmKatanServer(**kwargs).start_sync()
    pid = server.pid
    assert pid is not None
    try:
        yield server
    finally:
        server.stop_sync()
        _assert_gone(pid)  # the fixture leaves no process behind


@pytest.fixture(scope="module")
def katan() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-test")


@pytest.fixture(scope="module")
def slow_katan() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-slow", latency_ms=3000, stop_grace_s=1.0)


@pytest.fixture(scope="module")
def busy_katan() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-busy", latency_ms=200)


@pytest.fixture(scope="module")
def failing_katan() -> Iterator[LlmKatanServer]:
    yield from _katan(model="katan-fail", error_rate=1.0)


@pytest.fixture
async def make_backend() -> AsyncIterator[MakeBackend]:
    """Builds backends and closes them all at teardown (unclosed sessions fail the run)."""
    made: list[OpenAIBackend] = []

    def make(**kwargs: Any) -> OpenAIBackend:
        backend = OpenAIBackend(OpenAIBackendConfig(**kwargs))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def _katan_backend(make: MakeBackend, server: LlmKatanServer, **kwargs: Any) -> OpenAIBackend:
    kwargs.setdefault("base_url", server.base_url)
    kwargs.setdefault("model", server.model)
    kwargs.setdefault("api_key", server.api_key)
    return make(**kwargs)


def _chat(text: str = "hello megaflow", **kwargs: Any) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        task_id="t-1",
        messages=[
            common_pb2.ChatMessage(role="system", content="You are a test."),
            common_pb2.ChatMessage(role="user", content=text),
        ],
        **kwargs,
    )


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        (" http://127.0.0.1:8000/v1/ ", "http://127.0.0.1:8000/v1"),
        ("https://api.example.com/openai", "https://api.example.com/openai/v1"),
        ("http://h:1/v1/chat/completions", "http://h:1/v1"),
    ],
)
def test_base_url_is_normalised(given: str, expected: str) -> None:
    assert normalise_base_url(given) == expected
    assert OpenAIBackendConfig(base_url=given).base_url == expected


def test_config_validation_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        OpenAIBackendConfig(base_url="127.0.0.1:8000")
    with pytest.raises(ValidationError):
        OpenAIBackendConfig(base_url="http://h", bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        OpenAIBackendConfig(base_url="http://h", request_timeout_s=0)
    cfg = OpenAIBackendConfig(base_url="http://h", model="m")
    with pytest.raises(ValidationError):
        cfg.model = "other"
    assert (cfg.request_timeout_s, cfg.max_connections, cfg.version) == (120.0, 256, "upstream")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    backend = OpenAIBackend(cfg)  # never used: no session is created
    assert (backend.name, backend.version, backend.kind) == ("m", "upstream", "openai")
    assert backend._api_key == "from-env"
    assert OpenAIBackend(cfg.model_copy(update={"api_key": "k"}))._api_key == "k"
    named = OpenAIBackend(OpenAIBackendConfig(base_url="http://h", model="m", name="mf"))
    assert named.name == "mf"
    _: ModelBackend = backend  # satisfies the Protocol (checked by mypy)


# -- against llm-katan ------------------------------------------------------------------------


async def test_generate_echo(katan: LlmKatanServer, make_backend: MakeBackend) -> None:
    backend = _katan_backend(make_backend, katan, name="mf-model", version="ckpt-7")
    resp = await backend.generate(_chat("hello megaflow", max_tokens=64, temperature=0.2))
    assert resp.message.role == "assistant"
    assert "[echo]" in resp.message.content
    assert "User: hello megaflow" in resp.message.content
    assert "max_tokens=64" in resp.message.content  # our parameters reached the server
    assert "temperature=0.2" in resp.message.content
    assert resp.prompt_tokens > 0 and resp.completion_tokens > 0
    assert resp.model == "mf-model"
    assert resp.model_version == "ckpt-7"
    assert resp.finish_reason == "stop"
    assert 0 < resp.latency_s < 5
    stats = backend.stats()
    assert (stats.requests, stats.in_flight, stats.utilisation) == (1, 0, 0.0)


async def test_model_defaults_to_first_upstream_model(
    katan: LlmKatanServer, make_backend: MakeBackend
) -> None:
    assert await list_upstream_models(katan.api_base, 5.0, api_key=katan.api_key) == [katan.model]
    backend = _katan_backend(make_backend, katan, model="")
    assert backend.name == ""
    resp = await backend.generate(_chat())
    assert backend.model == backend.name == resp.model == katan.model
    assert "[echo]" in resp.message.content


async def test_tools_are_passed_through(katan: LlmKatanServer, make_backend: MakeBackend) -> None:
    backend = _katan_backend(make_backend, katan)
    request = _chat("list the files")
    request.tools.extend(tool_specs())
    resp = await backend.generate(request)
    # llm-katan's echo answers any request with tools by calling the first tool.
    assert resp.finish_reason == "tool_calls"
    assert resp.message.content == ""
    [call] = resp.message.tool_calls
    assert call.name == "bash" and call.id
    assert json.loads(call.arguments_json) == {"command": "test_command"}

    # Feed the call and its result back: a full tool round trip is accepted.
    request.messages.append(resp.message)
    request.messages.append(
        common_pb2.ChatMessage(role="tool", content="a.py\nb.py", tool_call_id=call.id, name="bash")
    )
    again = await backend.generate(request)
    assert again.message.tool_calls[0].name == "bash"


async def test_100_concurrent_generates(
    busy_katan: LlmKatanServer, make_backend: MakeBackend
) -> None:
    """Each answer takes 200 ms upstream: 100 calls in well under 100 x 200 ms = 20 s."""
    backend = _katan_backend(make_backend, busy_katan)
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, backend.stats().in_flight)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    try:
        responses = await asyncio.gather(*(backend.generate(_chat(f"req-{i}")) for i in range(100)))
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - t0
    assert elapsed < 5, elapsed
    assert peak == 100
    for i, resp in enumerate(responses):
        assert f"User: req-{i}" in resp.message.content
    stats = backend.stats()
    assert (stats.requests, stats.in_flight) == (100, 0)
    assert backend.failures == 0


async def test_deadline_raises_model_unavailable_quickly(
    slow_katan: LlmKatanServer, make_backend: MakeBackend
) -> None:
    backend = _katan_backend(make_backend, slow_katan, request_timeout_s=0.3, retry=NO_RETRY)
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailableError, match=r"timed out after 0\.3s") as info:
        await backend.generate(_chat())
    assert time.monotonic() - t0 < 1.5
    assert slow_katan.base_url in str(info.value)
    assert info.value.retryable
    assert backend.stats().in_flight == 0 and backend.failures == 1


async def test_injected_500s_are_model_unavailable(
    failing_katan: LlmKatanServer, make_backend: MakeBackend
) -> None:
    backend = _katan_backend(make_backend, failing_katan, retry=NO_RETRY)
    for _ in range(3):
        with pytest.raises(ModelUnavailableError, match="HTTP 500: internal server error"):
            await backend.generate(_chat())


async def test_missing_api_key_is_invalid_request(
    katan: LlmKatanServer, make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = _katan_backend(make_backend, katan, api_key=None)
    with pytest.raises(InvalidRequestError, match=r"\(HTTP 401\): missing Authorization header"):
        await backend.generate(_chat())
    # The key is read from the environment when the backend is constructed.
    monkeypatch.setenv("OPENAI_API_KEY", katan.api_key)
    backend = _katan_backend(make_backend, katan, api_key=None)
    assert "[echo]" in (await backend.generate(_chat())).message.content


async def test_closed_backend_refuses(katan: LlmKatanServer, make_backend: MakeBackend) -> None:
    backend = _katan_backend(make_backend, katan)
    await backend.generate(_chat())
    await backend.close()
    with pytest.raises(ModelUnavailableError, match="closed"):
        await backend.generate(_chat())
    await backend.close()  # idempotent


async def test_connection_refused_is_model_unavailable(make_backend: MakeBackend) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    backend = make_backend(base_url=url, model="m", request_timeout_s=5, retry=NO_RETRY)
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        await backend.generate(_chat())
    assert time.monotonic() - t0 < 2
    assert f"{url}/v1/chat/completions" in str(info.value)
    with pytest.raises(ModelUnavailableError, match="cannot connect"):
        await list_upstream_models(url, 2.0)


# -- server lifecycle ----------------------------------------------------------------------


async def test_server_stop_leaves_no_process() -> None:
    async with LlmKatanServer(latency_ms=10) as server:
        pid = server.pid
        assert pid is not None and server.running
        assert os.getpgid(pid) == pid  # its own process group
        assert "--latency-ms" in server.argv()
    assert not server.running and server.pid is None
    _assert_gone(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    await server.stop()  # idempotent


async def test_server_startup_failure_is_reported() -> None:
    fake = [sys.executable, "-c", "import sys; print('katan-boom'); sys.exit(3)"]
    server = LlmKatanServer(command=fake, startup_timeout_s=10)
    with pytest.raises(LlmKatanError, match=r"(?s)status 3.*katan-boom"):
        await server.start()
    assert server.pid is None


# -- against a tiny local aiohttp server -------------------------------------------------------

_OK_BODY = {
    "choices": [
        {
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "edit_file", "arguments": {"path": "a.py"}},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ]
}  # no usage: tokens are 0; arguments as an object: re-encoded as JSON


@pytest.fixture
async def fake_upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """Base URL of a server whose behaviour is chosen by the path prefix, and its requests."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        seen.append({"headers": dict(request.headers), "body": await request.json()})
        error = {"error": {"message": f"upstream says {mode}", "type": "x"}}
        answers: dict[str, Callable[[], web.StreamResponse]] = {
            "ok": lambda: web.json_response(_OK_BODY),
            "s500": lambda: web.json_response(error, status=500),
            "s502": lambda: web.Response(status=502, text="<html>bad gateway</html>"),
            "s429": lambda: web.json_response(error, status=429),
            "s400": lambda: web.json_response(error, status=400),
            "s404": lambda: web.json_response({"detail": "Not Found"}, status=404),
            "garbage": lambda: web.Response(text="this is not json", content_type="text/plain"),
            "nochoices": lambda: web.json_response({"id": "x", "choices": []}),
            "nomessage": lambda: web.json_response({"choices": [{"finish_reason": "stop"}]}),
        }
        return answers[mode]()

    app = web.Application()
    app.router.add_post("/{mode}/v1/chat/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_request_and_response_conversion(
    fake_upstream: tuple[str, list[dict[str, Any]]], make_backend: MakeBackend
) -> None:
    base, seen = fake_upstream
    backend = make_backend(base_url=f"{base}/ok", model="up-model", api_key="sk-test", name="mf")
    request = model_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role="user", content="fix it"),
            common_pb2.ChatMessage(
                role="assistant",
                tool_calls=[
                    common_pb2.ToolCall(id="c1", name="bash", arguments_json='{"command": "ls"}')
                ],
            ),
            common_pb2.ChatMessage(role="tool", content="a.py", tool_call_id="c1", name="bash"),
        ],
        tools=tool_specs()[:1],
        tool_choice="bash",
        max_tokens=32,
        temperature=0.0,
    )
    resp = await backend.generate(request)
    [sent] = seen
    assert sent["headers"]["Authorization"] == "Bearer sk-test"
    body = sent["body"]
    assert body["model"] == "up-model" and body["max_tokens"] == 32 and body["temperature"] == 0
    assert body["messages"] == [
        {"role": "user", "content": "fix it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "bash", "arguments": '{"command": "ls"}'},
                }
            ],
        },
        {"role": "tool", "content": "a.py", "tool_call_id": "c1", "name": "bash"},
    ]
    [tool] = body["tools"]
    assert tool["type"] == "function" and tool["function"]["name"] == "bash"
    assert tool["function"]["parameters"]["required"] == ["command"]
    assert tool["function"]["description"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "bash"}}

    assert resp.message.content == ""
    [call] = resp.message.tool_calls
    assert (call.id, call.name, json.loads(call.arguments_json)) == (
        "call_1",
        "edit_file",
        {"path": "a.py"},
    )
    assert (resp.prompt_tokens, resp.completion_tokens) == (0, 0)
    assert (resp.finish_reason, resp.model, resp.model_version) == ("tool_calls", "mf", "upstream")


@pytest.mark.parametrize(
    ("mode", "error", "pattern"),
    [
        ("s500", ModelUnavailableError, "HTTP 500: upstream says s500"),
        ("s502", ModelUnavailableError, "HTTP 502: <html>bad gateway</html>"),
        ("s429", ModelUnavailableError, "HTTP 429: upstream says s429"),
        ("garbage", ModelUnavailableError, "malformed JSON: 'this is not json'"),
        ("nochoices", ModelUnavailableError, "without choices"),
        ("nomessage", ModelUnavailableError, "without a message"),
        ("s400", InvalidRequestError, r"rejected the request \(HTTP 400\): upstream says s400"),
        ("s404", InvalidRequestError, r"\(HTTP 404\): Not Found"),
    ],
)
async def test_upstream_failures_are_mapped(
    fake_upstream: tuple[str, list[dict[str, Any]]],
    make_backend: MakeBackend,
    mode: str,
    error: type[Exception],
    pattern: str,
) -> None:
    base, _ = fake_upstream
    backend = make_backend(
        base_url=f"{base}/{mode}", model="m", request_timeout_s=5, retry=NO_RETRY
    )
    with pytest.raises(error, match=pattern) as info:
        await backend.generate(_chat())
    assert f"{base}/{mode}/v1/chat/completions" in str(info.value)
    assert backend.stats().in_flight == 0


async def test_invalid_tool_schema_is_invalid_request(
    fake_upstream: tuple[str, list[dict[str, Any]]], make_backend: MakeBackend
) -> None:
    base, seen = fake_upstream
    backend = make_backend(base_url=f"{base}/ok", model="m")
    request = _chat()
    request.tools.append(common_pb2.ToolSpec(name="t", parameters_json_schema="{nope"))
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        await backend.generate(request)
    with pytest.raises(InvalidRequestError, match="at least one message"):
        await backend.generate(model_pb2.GenerateRequest())
    assert seen == []


async def test_deadline_against_a_sleeping_server(make_backend: MakeBackend) -> None:
    """Even a server that accepts and then never answers cannot hang a request."""
    stop = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        backend = make_backend(
            base_url=f"http://127.0.0.1:{port}", model="m", request_timeout_s=0.2, retry=NO_RETRY
        )
        t0 = time.monotonic()
        with pytest.raises(ModelUnavailableError, match="timed out"):
            await backend.generate(_chat())
        assert time.monotonic() - t0 < 1.0
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
