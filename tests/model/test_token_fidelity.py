"""Token fidelity end to end: a real TaskSession (tool agent), a real sandbox, a real (tiny) model.

The trajectory must keep exactly the ids the model produced: decoding each turn's
completion ids with the same tokenizer gives back exactly the assistant text the agent
saw, every completion token has a logprob, and the prompt ids are the chat template's
rendering of the conversation the agent sent.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.agent.session import AgentLimits, TaskSession
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.service import ModelServiceImpl
from megaflow.model.transformers_backend import TransformersBackend, TransformersBackendConfig
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedBackend, simulated_decode
from megaflow.testing.tiny_lm import cached_tiny_lm

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_tiny_lm(tmp_path_factory.getbasetemp())


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[SandboxEnvironmentService]:
    async with SandboxEnvironmentService(EnvServiceConfig(root_dir=tmp_path / "sb")) as svc:
        yield svc


async def test_transformers_trajectory_keeps_exact_token_ids(
    tiny_lm: Path, env: SandboxEnvironmentService
) -> None:
    backend = TransformersBackend(TransformersBackendConfig(path=tiny_lm, name="tiny", seed=1))
    service = ModelServiceImpl([backend])
    task = generate_tasks(1, seed=3)[0]
    task.model = "tiny"
    task.budgets.max_steps = 3
    limits = AgentLimits(max_completion_tokens=24)
    try:
        result, trajectory = await TaskSession(
            task, "a1", env=env, model=service, limits=limits
        ).run()
    finally:
        await service.stop()
    assert len(trajectory.turns) == 3  # the tiny model never calls a tool: step limit
    assert "step limit" in result.error
    tokenizer = backend.tokenizer
    conversation: list = []
    for turn in trajectory.turns:
        ids = list(turn.completion_token_ids)
        assert ids, "every turn carries the completion ids"
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert text == turn.response.content
        assert len(turn.completion_logprobs) == len(ids) == turn.completion_tokens
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in turn.completion_logprobs)
        conversation.extend(turn.prompt_delta)
        rendered = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in conversation],
            tokenize=False,
            add_generation_prompt=True,
        )
        expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert list(turn.prompt_token_ids) == expected
        assert turn.prompt_tokens == len(expected)
        assert turn.model_version == backend.version != ""
        assert turn.replica  # which replica served it, copied from the response
        conversation.append(turn.response)


async def test_simulated_trajectory_carries_decodable_token_ids(
    env: SandboxEnvironmentService,
) -> None:
    service = ModelServiceImpl([SimulatedBackend.fast()])
    task = generate_tasks(1, seed=3)[0]
    result, trajectory = await TaskSession(
        task, "a1", env=env, model=service, limits=AgentLimits()
    ).run()
    await service.stop()
    assert result.has_reward
    for turn in trajectory.turns:
        message = turn.response
        out = message.content + "".join(c.name + c.arguments_json for c in message.tool_calls)
        assert simulated_decode(list(turn.completion_token_ids)) == out
        assert len(turn.completion_logprobs) == len(turn.completion_token_ids)
        assert turn.completion_tokens == len(turn.completion_token_ids)
        assert turn.prompt_tokens == len(turn.prompt_token_ids) > 0
