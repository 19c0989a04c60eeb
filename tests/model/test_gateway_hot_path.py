"""What the gateway's lean request path must keep: whole recordings (appended, or
replaced when a client rewrites its history), tool specs built once per distinct list
(and still per request), LRU-bounded recording, and several gateways on one port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from megaflow.model import gateway_codec as codec
from megaflow.model.gateway import TASK_HEADER, Gateway, GatewayConfig
from megaflow.model.service import ModelServiceImpl
from megaflow.testing.simulated_model import SimulatedBackend

pytestmark = pytest.mark.integration

OPENING = [
    {"role": "system", "content": "You fix bugs."},
    {"role": "user", "content": "The function add in calc.py returns a - b."},
]


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    service = ModelServiceImpl([SimulatedBackend.fast()])
    async with Gateway(service, config=GatewayConfig(max_recorded_tasks=2)) as gw:
        yield gw
    await service.stop()


async def _chat(gw: Gateway, task: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.base_url + "/chat/completions",
            json={"model": "simulated", "messages": messages},
            headers={TASK_HEADER: task},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def test_a_growing_conversation_is_appended_a_rewritten_one_replaces(
    gateway: Gateway,
) -> None:
    messages = list(OPENING)
    first = await _chat(gateway, "t", messages)
    messages += [first["choices"][0]["message"], {"role": "user", "content": "go on"}]
    await _chat(gateway, "t", messages)
    recorded = gateway.trajectory("t")
    assert recorded is not None and len(recorded.turns) == 2
    # the answer was recorded with the first turn: what is new is the user's message
    assert [m.role for m in recorded.turns[1].prompt_delta] == ["user"]
    assert [m.content for m in recorded.messages[:4]] == [m["content"] or "" for m in messages]
    assert len(recorded.messages) == 5  # the conversation and the last answer

    # the client starts over with a shorter history: the record follows it
    await _chat(gateway, "t", [OPENING[1]])
    recorded = gateway.trajectory("t")
    assert recorded is not None and len(recorded.turns) == 3
    assert [m.role for m in recorded.turns[2].prompt_delta] == ["user"]
    assert [m.role for m in recorded.messages] == ["user", "assistant"]


async def test_recording_keeps_the_most_recently_used_tasks(gateway: Gateway) -> None:
    for task in ("a", "b", "a", "c"):  # max_recorded_tasks=2: b is the least recent
        await _chat(gateway, task, OPENING)
    assert gateway.trajectory("b") is None
    a, c = gateway.trajectory("a"), gateway.trajectory("c")
    assert a is not None and len(a.turns) == 2 and c is not None


async def test_a_reused_task_id_keeps_a_bounded_number_of_turns() -> None:
    """A client that tags every call with the same task id (the gateway bench's r-0..r-63)
    does not grow the record without bound: the most recent turns are kept, indices go on."""
    service = ModelServiceImpl([SimulatedBackend.fast()])
    async with Gateway(service, config=GatewayConfig(max_recorded_turns=8)) as gw:
        for _ in range(30):
            await _chat(gw, "reused", OPENING)
        recorded = gw.trajectory("reused")
        assert recorded is not None
        assert 6 <= len(recorded.turns) <= 8
        assert recorded.turns[-1].index == 29  # the last call is the 30th turn
        indices = [t.index for t in recorded.turns]
        assert indices == list(range(30 - len(indices), 30))  # the most recent, in order
        assert [m.role for m in recorded.messages] == ["system", "user", "assistant"]
    await service.stop()


def test_tool_specs_are_shared_per_list_but_every_request_has_its_own() -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "bash", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    body = {"model": "m", "messages": OPENING, "tools": tools}
    one, two = codec.chat_request(body, "x"), codec.chat_request(body, "y")
    assert [t.name for t in one.tools] == ["bash"] and one.tools == two.tools
    one.tools[0].name = "changed"  # a request's copy is its own
    assert codec.chat_request(body, "z").tools[0].name == "bash"
    other = [{"type": "function", "function": {"name": "python"}}]
    assert [t.name for t in codec.chat_request({**body, "tools": other}, "x").tools] == ["python"]


async def test_several_gateways_share_a_port_with_reuse_port() -> None:
    service = ModelServiceImpl([SimulatedBackend.fast()])
    async with Gateway(service, reuse_port=True) as first:
        async with Gateway(service, port=first.port, reuse_port=True) as second:
            assert second.port == first.port
            answers = await asyncio.gather(*(_chat(first, f"t{i}", OPENING) for i in range(8)))
            assert all(a["choices"][0]["message"]["role"] == "assistant" for a in answers)
    await service.stop()


async def test_answer_ids_are_unique() -> None:
    service = ModelServiceImpl([SimulatedBackend.fast()])
    async with Gateway(service) as gw:
        answers = await asyncio.gather(*(_chat(gw, "", OPENING) for _ in range(20)))
    await service.stop()
    ids = [a["id"] for a in answers]
    assert len(set(ids)) == len(ids) and all(i.startswith("chatcmpl-") for i in ids)


async def test_the_low_level_dispatch_answers_as_the_router_did() -> None:
    """The gateway serves without web.Application: unknown paths, wrong methods, HEAD,
    the trajectory routes and the body limit answer as aiohttp's router made them."""
    service = ModelServiceImpl([SimulatedBackend.fast()])
    config = GatewayConfig(max_body_bytes=2048)
    async with Gateway(service, config=config) as gw, aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/v1/nothing") as resp:
            assert (resp.status, await resp.text()) == (404, "404: Not Found")
        async with session.get(gw.base_url + "/chat/completions") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
        async with session.head(gw.url + "/health") as resp:
            assert resp.status == 200
        async with session.post(
            gw.base_url + "/chat/completions", data=b"{" + b" " * 4096 + b"}"
        ) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        await _chat(gw, "t/1", OPENING)
        path = gw.base_url + "/megaflow/trajectories/t/1"  # a slash in the id: not a route
        async with session.get(path) as resp:
            assert resp.status == 404
        path = gw.base_url + "/megaflow/trajectories/t%3A1"
        async with session.get(path) as resp:
            assert resp.status == 404  # nothing recorded under "t:1"
            assert (await resp.json())["error"]["type"] == "not_found_error"
        await _chat(gw, "t-2", OPENING)
        async with session.get(gw.base_url + "/megaflow/trajectories/t-2") as resp:
            assert resp.status == 200 and (await resp.json())["task_id"] == "t-2"
        async with session.delete(gw.base_url + "/megaflow/trajectories/t-2") as resp:
            assert (await resp.json()) == {"deleted": "t-2"}
        async with session.put(gw.base_url + "/megaflow/trajectories/t-2") as resp:
            assert resp.status == 405
    await service.stop()
