"""The OpenAI-compatible gateway, driven by the official `openai` client and raw aiohttp."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from megaflow.agent import tools
from megaflow.core.errors import ModelUnavailableError
from megaflow.model.gateway import TASK_HEADER, Gateway, GatewayConfig
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig
from megaflow.model.openai_messages import tool_to_openai
from megaflow.model.service import ModelServiceConfig, ModelServiceImpl
from megaflow.tasks.swe_synth import generate_tasks, parse_problem_statement
from megaflow.testing.scripted import ScriptedBackend
from megaflow.testing.simulated_model import SimulatedBackend, simulated_decode
from megaflow.v1 import common_pb2, model_pb2

pytestmark = pytest.mark.integration

TASK = generate_tasks(1, seed=11)[0]
SYSTEM = "You fix bugs."


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    service = ModelServiceImpl([SimulatedBackend.fast(name="sim", version="sim-7")])
    async with Gateway(service) as gw:
        yield gw
    await service.stop()


def _client(gw: Gateway, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=api_key, max_retries=0, timeout=20, **kw)


def _tools() -> list[dict[str, Any]]:
    return [tool_to_openai(s) for s in tools.tool_specs()]


def _opening() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TASK.problem_statement},
    ]


async def test_models_list_and_a_chat(gateway: Gateway) -> None:
    client = _client(gateway)
    models = await asyncio.to_thread(client.models.list)
    assert [m.id for m in models.data] == ["sim"]
    reply = await asyncio.to_thread(
        client.chat.completions.create, model="sim", messages=_opening(), tools=_tools()
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == tools.BASH
    _, path = parse_problem_statement(TASK.problem_statement) or ("", "")
    assert json.loads(call.function.arguments) == {"command": f"cat {shlex.quote(path)}"}
    assert reply.model == "sim" and reply.system_fingerprint == "sim-7"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    client.close()


async def test_a_tool_call_round_trip(gateway: Gateway) -> None:
    """The assistant's tool call and the tool's result go back; the policy reads them."""
    client = _client(gateway, default_headers={TASK_HEADER: TASK.task_id})
    messages = _opening()
    first = await asyncio.to_thread(
        client.chat.completions.create, model="sim", messages=messages, tools=_tools()
    )
    (call,) = first.choices[0].message.tool_calls or []
    _, path = parse_problem_statement(TASK.problem_statement) or ("", "")
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": TASK.files[path].decode()})
    second = await asyncio.to_thread(
        client.chat.completions.create, model="sim", messages=messages, tools=_tools()
    )
    (edit,) = second.choices[0].message.tool_calls or []
    assert edit.function.name == tools.EDIT_FILE  # it saw the file: it edits the bug
    assert json.loads(edit.function.arguments)["path"] == path
    recorded = gateway.trajectory(TASK.task_id)
    assert recorded is not None and len(recorded.turns) == 2
    assert [m.role for m in recorded.turns[1].prompt_delta] == ["tool"]
    client.close()


async def test_tool_choice_reaches_the_model(gateway: Gateway) -> None:
    """OpenAI's `tool_choice` is passed on: "none" gets no tool call, a named function
    gets a call of that function; a malformed one is a 400 naming the field."""
    client = _client(gateway)

    def ask(choice: Any) -> Any:
        return client.chat.completions.create(
            model="sim", messages=_opening(), tools=_tools(), tool_choice=choice
        )

    none = (await asyncio.to_thread(ask, "none")).choices[0]
    assert not none.message.tool_calls and none.finish_reason == "stop"
    named = await asyncio.to_thread(ask, {"type": "function", "function": {"name": tools.SUBMIT}})
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == tools.SUBMIT
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        await asyncio.to_thread(ask, {"type": "function"})
    client.close()


async def test_streaming_chat_matches_the_plain_answer(gateway: Gateway) -> None:
    client = _client(gateway)
    plain = await asyncio.to_thread(
        client.chat.completions.create, model="sim", messages=_opening(), tools=_tools()
    )

    def stream() -> tuple[str, list[Any], str | None, Any]:
        content, calls, finish, usage = "", [], None, None
        for chunk in client.chat.completions.create(
            model="sim",
            messages=_opening(),
            tools=_tools(),
            stream=True,
            stream_options={"include_usage": True},
        ):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                content += choice.delta.content or ""
                calls.extend(choice.delta.tool_calls or [])
                finish = choice.finish_reason or finish
        return content, calls, finish, usage

    content, calls, finish, usage = await asyncio.to_thread(stream)
    assert content == plain.choices[0].message.content
    (call,) = calls
    (expected,) = plain.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == (
        expected.function.name,
        expected.function.arguments,
    )
    assert finish == "tool_calls"
    assert usage is not None and usage.total_tokens == plain.usage.total_tokens  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        body = {
            "model": "sim",
            "messages": _opening(),
            "tools": _tools(),
            "stream": True,
            "return_token_ids": True,
        }
        async with session.post(gateway.base_url + "/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.text()
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    # Streamed, each chunk carries the ids of the tokens that came with it: all of them,
    # in order, spell the whole answer.
    ids = [
        i
        for e in events[:-1]
        for choice in json.loads(e.removeprefix("data: "))["choices"]
        for i in choice.get("token_ids", [])
    ]
    assert simulated_decode(ids) == content + call.function.name + (call.function.arguments or "")
    client.close()


async def test_text_completions(gateway: Gateway) -> None:
    client = _client(gateway)
    reply = await asyncio.to_thread(
        client.completions.create, model="sim", prompt=TASK.problem_statement
    )
    assert reply.choices[0].text.startswith("Let me look at")
    client.close()


async def test_errors_are_openai_shaped_with_http_codes(gateway: Gateway) -> None:
    client = _client(gateway)
    with pytest.raises(openai.BadRequestError) as bad:
        await asyncio.to_thread(client.chat.completions.create, model="sim", messages=[])
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        await asyncio.to_thread(
            client.chat.completions.create, model="no-such-model", messages=_opening()
        )
    async with aiohttp.ClientSession() as session:
        url = gateway.base_url + "/chat/completions"
        async with session.post(url, data=b"{not json") as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
        bad_role = {"messages": [{"role": "wizard", "content": "hi"}]}
        async with session.post(url, json=bad_role) as resp:
            assert resp.status == 400
            assert "role" in (await resp.json())["error"]["message"]
    client.close()


async def test_a_failing_model_is_503_and_a_full_gateway_is_429() -> None:
    """A model that keeps failing is 'unavailable' (503, retry later), never a 200."""
    failing = ScriptedBackend(lambda task, i: ModelUnavailableError("replica down"))
    service = ModelServiceImpl([failing], config=ModelServiceConfig(deadline_s=0.5))
    async with Gateway(service) as gw, aiohttp.ClientSession() as session:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        async with session.post(gw.base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
            assert error["type"] == "service_unavailable_error"
            assert "replica down" in error["message"]
    await service.stop()

    slow = SimulatedBackend(
        latency=GpuLatencyModel(LatencyConfig(overhead_s=1.0, decode_s_per_token=0.0))
    )
    service = ModelServiceImpl([slow])
    config = GatewayConfig(max_in_flight=1)
    async with Gateway(service, config=config) as gw, aiohttp.ClientSession() as session:
        url = gw.base_url + "/chat/completions"
        body = {"messages": _opening()}
        first = asyncio.create_task(session.post(url, json=body))
        while gw.in_flight < 1:
            await asyncio.sleep(0.01)
        async with session.post(url, json=body) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
        async with await first as resp:
            assert resp.status == 200
    await service.stop()


async def test_calls_are_recorded_per_task_with_token_ids(gateway: Gateway) -> None:
    key = gateway.issue_key("task-a")
    client = _client(gateway, api_key=key)
    anonymous = _client(gateway)
    reply = await asyncio.to_thread(
        client.chat.completions.create,
        model="sim",
        messages=_opening(),
        tools=_tools(),
        logprobs=True,
        extra_body={"return_token_ids": True},
    )
    await asyncio.to_thread(anonymous.chat.completions.create, model="sim", messages=_opening())
    extra = reply.choices[0].model_extra or {}
    token_ids = extra["token_ids"]
    assert reply.choices[0].logprobs is not None
    assert len(reply.choices[0].logprobs.content or []) == len(token_ids)
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.base_url}/megaflow/trajectories/task-a"
        async with session.get(url) as resp:
            assert resp.status == 200
            recorded = await resp.json()
        async with session.get(f"{gateway.base_url}/megaflow/trajectories/nobody") as resp:
            assert resp.status == 404
    (turn,) = recorded["turns"]  # the anonymous call is not recorded
    assert turn["completion_token_ids"] == token_ids
    assert len(turn["completion_logprobs"]) == len(token_ids)
    message = reply.choices[0].message
    calls = "".join(c.function.name + c.function.arguments for c in message.tool_calls or [])
    assert simulated_decode(token_ids) == (message.content or "") + calls
    assert turn["prompt_token_ids"] and turn["model_version"] == "sim-7"
    client.close()
    anonymous.close()


async def test_require_key_rejects_anonymous_calls() -> None:
    service = ModelServiceImpl([SimulatedBackend.fast()])
    async with Gateway(service, config=GatewayConfig(require_key=True)) as gw:
        with pytest.raises(openai.AuthenticationError):
            await asyncio.to_thread(
                _client(gw).chat.completions.create, model="simulated", messages=_opening()
            )
        ok = await asyncio.to_thread(
            _client(gw, api_key=gw.issue_key("t1")).chat.completions.create,
            model="simulated",
            messages=_opening(),
        )
        assert ok.choices[0].message.tool_calls
    await service.stop()


async def test_openai_backend_reads_token_ids_through_the_gateway(gateway: Gateway) -> None:
    """MegaFlow's own `openai` backend asks for token ids the vLLM way and keeps them."""
    backend = OpenAIBackend(
        OpenAIBackendConfig(base_url=gateway.base_url, model="sim", request_token_ids=True)
    )
    try:
        response = await backend.generate(
            model_pb2.GenerateRequest(
                task_id=TASK.task_id,
                messages=[common_pb2.ChatMessage(role="user", content=TASK.problem_statement)],
                tools=tools.tool_specs(),
            )
        )
    finally:
        await backend.close()
    message = response.message
    out = message.content + "".join(c.name + c.arguments_json for c in message.tool_calls)
    assert simulated_decode(list(response.completion_token_ids)) == out
    assert len(response.completion_logprobs) == len(response.completion_token_ids)
    assert simulated_decode(list(response.prompt_token_ids)) == TASK.problem_statement


async def test_openai_backend_reads_ids_from_token_id_logprob_names(gateway: Gateway) -> None:
    """Without `return_token_ids`, ids come from `token_id:<id>` logprob entries (vLLM's
    `return_tokens_as_token_ids` shape); the prompt ids stay unknown (empty)."""
    backend = OpenAIBackend(OpenAIBackendConfig(base_url=gateway.base_url, model="sim"))
    try:
        response = await backend.generate(
            model_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content=TASK.problem_statement)]
            )
        )
    finally:
        await backend.close()
    out = response.message.content + "".join(
        c.name + c.arguments_json for c in response.message.tool_calls
    )
    assert simulated_decode(list(response.completion_token_ids)) == out
    assert len(response.completion_logprobs) == len(response.completion_token_ids)
    assert list(response.prompt_token_ids) == []
