"""`TransformersBackend` on a tiny GPT-2 trained at test time: batching, limits, fidelity."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import aiohttp
import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.model.backend import ModelBackend
from megaflow.model.gateway import TASK_HEADER, Gateway
from megaflow.model.service import ModelServiceImpl
from megaflow.model.transformers_backend import (
    TransformersBackend,
    TransformersBackendConfig,
    parse_tool_calls,
)
from megaflow.testing.tiny_lm import cached_tiny_lm
from megaflow.v1 import common_pb2, model_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_tiny_lm(tmp_path_factory.getbasetemp())


def _request(
    text: str, max_tokens: int = 16, temperature: float = 0.0
) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        task_id="t",
        messages=[
            common_pb2.ChatMessage(role="system", content="You are a careful software engineer."),
            common_pb2.ChatMessage(role="user", content=text),
        ],
        max_tokens=max_tokens,
        temperature=temperature,
    )


def _decode(backend: TransformersBackend, ids: list[int]) -> str:
    text: str = backend.tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return text


async def test_concurrent_requests_are_batched_and_padding_changes_nothing(
    tiny_lm: Path,
) -> None:
    backend = TransformersBackend(TransformersBackendConfig(path=tiny_lm, batch_wait_s=0.05))
    try:
        alone = await backend.generate(_request("Fix `src/util_3.py`"))
        before = backend.batches
        prompts = ["Fix `src/util_3.py`", "Fix `src/core_7.py`: the tests fail " * 4, "hi"]
        batched = await asyncio.gather(*(backend.generate(_request(p)) for p in prompts))
        assert backend.batches - before < len(prompts)  # served together
        # Greedy decoding of the short prompt, left-padded next to longer ones, is the same.
        assert list(batched[0].completion_token_ids) == list(alone.completion_token_ids)
        for a, b in zip(batched[0].completion_logprobs, alone.completion_logprobs, strict=True):
            assert math.isclose(a, b, abs_tol=1e-3)
        for response in (alone, *batched):
            ids = list(response.completion_token_ids)
            assert _decode(backend, ids) == response.message.content
            assert len(response.completion_logprobs) == len(ids) == response.completion_tokens
            assert response.prompt_tokens == len(response.prompt_token_ids)
            assert response.model_version.startswith("tiny-gpt2-")
        assert backend.stats().requests == 4
    finally:
        await backend.close()


async def test_each_row_keeps_its_own_token_limit_and_sampling_works(tiny_lm: Path) -> None:
    backend: ModelBackend = TransformersBackend(
        TransformersBackendConfig(path=tiny_lm, name="tiny", batch_wait_s=0.05, seed=3)
    )
    try:
        short, long, sampled = await asyncio.gather(
            backend.generate(_request("Fix it", max_tokens=3)),
            backend.generate(_request("Fix it", max_tokens=40)),
            backend.generate(_request("Fix it", max_tokens=40, temperature=1.0)),
        )
        assert short.completion_tokens <= 3
        if short.completion_tokens == 3 and long.completion_tokens > 3:
            assert short.finish_reason == "length"
        assert list(long.completion_token_ids)[: short.completion_tokens] == list(
            short.completion_token_ids
        )  # greedy: the short answer is a prefix of the long one
        assert sampled.completion_tokens == len(sampled.completion_logprobs) > 0
        assert backend.name == "tiny"
    finally:
        await backend.close()


async def test_a_missing_model_directory_is_an_invalid_request(tmp_path: Path) -> None:
    backend = TransformersBackend(TransformersBackendConfig(path=tmp_path / "nothing"))
    with pytest.raises(InvalidRequestError, match="no Hugging Face model"):
        await backend.generate(_request("hi"))
    await backend.close()


def test_tool_calls_are_parsed_from_json_in_the_text() -> None:
    text = 'Let me look.\n<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>'
    (call,) = parse_tool_calls(text, "call_x")
    assert (call.name, json.loads(call.arguments_json), call.id) == (
        "bash",
        {"command": "ls"},
        "call_x_0",
    )
    assert parse_tool_calls("no tool here {not json}", "c") == []
    assert parse_tool_calls('{"arguments": {}}', "c") == []  # no name


async def test_through_the_gateway_the_recorded_ids_decode_to_the_answer(
    tiny_lm: Path,
) -> None:
    backend = TransformersBackend(TransformersBackendConfig(path=tiny_lm, name="tiny"))
    service = ModelServiceImpl([backend])
    async with Gateway(service) as gw, aiohttp.ClientSession() as session:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Fix `src/app_1.py`"}],
            "max_tokens": 12,
            "temperature": 0.8,
        }
        headers = {TASK_HEADER: "task-tiny"}
        async with session.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            answer = (await r.json())["choices"][0]["message"]["content"]
        async with session.get(gw.base_url + "/megaflow/trajectories/task-tiny") as r:
            (turn,) = (await r.json())["turns"]
    await service.stop()
    assert (
        _decode(backend, turn["completion_token_ids"])
        == answer
        == turn["response"].get("content", "")
    )
    assert len(turn["completion_logprobs"]) == len(turn["completion_token_ids"])
