"""Agent checkpoints and resume, with the simulated model and the simulated environment.

The agent writes its state to a real SQLite ledger as it runs; a second attempt given
that checkpoint replays the recorded actions into a fresh environment and continues,
calling the model fewer times than a run from scratch, with the same reward and one
continuous trajectory.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

from megaflow.agent.checkpoint import (
    CheckpointConfig,
    Encoded,
    Mark,
    StaleAttemptError,
    check_resumable,
    encode,
    is_pure_read,
    record,
)
from megaflow.agent.service import AgentServiceImpl
from megaflow.agent.tool_agent import SYSTEM_PROMPT
from megaflow.core.errors import ModelUnavailableError, ServiceUnavailableError
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.resolver import ServiceResolver
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_task
from megaflow.testing.simulated_env import SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import agent_pb2, common_pb2, model_pb2


class CountingBackend:
    """Test-only: the simulated model, counting calls per task; it raises an
    infrastructure error on call `fail_at` (0-based) of each task, once, and can hold
    call `hold_at` until `release` is set (`block_at`: forever)."""

    kind = "counting"

    def __init__(
        self,
        fail_at: int | None = None,
        hold_at: int | None = None,
        block_at: int | None = None,
    ) -> None:
        self.inner = SimulatedBackend.fast(success_rate=1.0)
        self.name, self.version = self.inner.name, self.inner.version
        self.fail_at, self.hold_at, self.block_at = fail_at, hold_at, block_at
        self.calls: dict[str, int] = defaultdict(int)
        self.failed: set[str] = set()
        self.release = asyncio.Event()

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        index = self.calls[request.task_id]
        self.calls[request.task_id] += 1
        if index == self.fail_at and request.task_id not in self.failed:
            self.failed.add(request.task_id)
            raise ModelUnavailableError(f"injected: replica lost on call {index}")
        if index == self.hold_at:
            await self.release.wait()
        if index == self.block_at:
            await asyncio.Event().wait()
        return await self.inner.generate(request)

    def stats(self) -> model_pb2.ModelStats:
        return self.inner.stats()

    async def close(self) -> None:
        return None


class Rig:
    """An Agent Service on the simulated model and environment, checkpointing to SQLite."""

    def __init__(self, tmp: Path, backend: CountingBackend, every: int = 1) -> None:
        self.backend = backend
        self.env = SimulatedEnvironmentService()
        self.model = ModelServiceImpl([backend])
        self.ledger = SqliteLedger(tmp / "ledger.sqlite")
        self.agent = AgentServiceImpl(
            ServiceResolver(model=self.model, env=self.env),
            store=self.ledger,
            checkpoints=CheckpointConfig(every_turns=every),
        )

    async def __aenter__(self) -> Rig:
        await self.ledger.open()
        await self.model.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.agent.stop()
        await self.model.stop()
        await self.ledger.close()

    async def attempt(
        self, task: common_pb2.TaskSpec, n: int, resume: bool = False
    ) -> agent_pb2.RunTaskResponse:
        attempt_id = f"{task.task_id}#{n}"
        await self.ledger.mark_running(task.task_id, n, attempt_id)
        request = agent_pb2.RunTaskRequest(task=task, attempt_id=attempt_id)
        if resume:
            checkpoint = await self.ledger.load_checkpoint(task.task_id)
            assert checkpoint is not None
            request.resume.ParseFromString(checkpoint.data)
        return await self.agent.run_task(request)


async def _undisturbed(
    tmp: Path, task: common_pb2.TaskSpec
) -> tuple[agent_pb2.RunTaskResponse, int]:
    backend = CountingBackend()
    async with Rig(tmp, backend) as rig:
        await rig.ledger.add_tasks("run", [task])
        response = await rig.attempt(task, 1)
    return response, backend.calls[task.task_id]


def _responses(trajectory: common_pb2.Trajectory) -> list[bytes]:
    return [t.response.SerializeToString() for t in trajectory.turns]


async def test_a_resumed_attempt_continues_from_the_checkpoint(tmp_path: Path) -> None:
    task = generate_task(0, 3)
    baseline, scratch_calls = await _undisturbed(tmp_path / "a", task)
    assert baseline.result.state == common_pb2.TASK_STATE_SUCCEEDED
    assert scratch_calls == len(baseline.trajectory.turns) >= 3

    k = 2  # the first attempt completes 2 turns, then its model fails
    backend = CountingBackend(fail_at=k)
    async with Rig(tmp_path / "b", backend) as rig:
        await rig.ledger.add_tasks("run", [task])
        with pytest.raises(ModelUnavailableError):
            await rig.attempt(task, 1)
        assert backend.calls[task.task_id] == k + 1
        checkpoint = await rig.ledger.load_checkpoint(task.task_id)
        assert checkpoint is not None and checkpoint.attempt_id == f"{task.task_id}#1"
        await rig.ledger.mark_retrying(task.task_id, 1, "model lost")
        response = await rig.attempt(task, 2, resume=True)
        assert rig.env.live == 0  # every environment released

    resumed_calls = backend.calls[task.task_id] - (k + 1)
    assert resumed_calls == scratch_calls - k < scratch_calls  # fewer model calls
    result, trajectory = response.result, response.trajectory
    assert result.state == common_pb2.TASK_STATE_SUCCEEDED
    assert result.reward == baseline.result.reward == 1.0
    # one continuous history: the same turns and conversation as the undisturbed run
    assert _responses(trajectory) == _responses(baseline.trajectory)
    # what the checkpoint left out of its turns (format 3) is restored: token ids, tool output
    for turn, undisturbed in zip(trajectory.turns, baseline.trajectory.turns, strict=True):
        assert turn.prompt_token_ids == undisturbed.prompt_token_ids
        assert list(turn.prompt_delta) == list(undisturbed.prompt_delta)
        assert (turn.reused_prompt_ids, list(turn.observation_of)) == (0, [])
    stored = common_pb2.AgentCheckpoint.FromString(checkpoint.data).trajectory.turns
    assert stored[1].reused_prompt_ids > 0 and any(stored[1].observation_of)  # left out
    assert [t.index for t in trajectory.turns] == list(range(len(trajectory.turns)))
    assert [m.content for m in trajectory.messages] == [
        m.content for m in baseline.trajectory.messages
    ]
    assert result.steps == len(trajectory.turns) == scratch_calls
    assert result.prompt_tokens == baseline.result.prompt_tokens  # budgets carried over
    (resumption,) = trajectory.resumptions
    assert resumption.at_turn == k
    assert resumption.from_attempt_id == f"{task.task_id}#1"
    assert resumption.attempt_id == trajectory.attempt_id == f"{task.task_id}#2"
    assert resumption.method == "replay"
    assert resumption.replayed_actions == 1  # the edit; the `cat` is a pure read


async def test_a_checkpoint_that_no_longer_replays_falls_back_to_a_fresh_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = generate_task(0, 4)
    baseline, scratch_calls = await _undisturbed(tmp_path / "a", task)
    backend = CountingBackend(fail_at=2)
    async with Rig(tmp_path / "b", backend) as rig:
        await rig.ledger.add_tasks("run", [task])
        with pytest.raises(ModelUnavailableError):
            await rig.attempt(task, 1)
        stored = await rig.ledger.load_checkpoint(task.task_id)
        assert stored is not None
        checkpoint = common_pb2.AgentCheckpoint.FromString(stored.data)
        edit = checkpoint.trajectory.turns[1]
        assert edit.response.tool_calls[0].name == "edit_file"
        assert edit.actions[0].kind == "edit"
        edit.actions[0].observation += " (recorded on another image)"  # the env differs now
        request = agent_pb2.RunTaskRequest(task=task, attempt_id=f"{task.task_id}#2")
        request.resume.CopyFrom(checkpoint)
        await rig.ledger.mark_running(task.task_id, 2, request.attempt_id)
        with caplog.at_level("WARNING", logger="megaflow.agent.session"):
            response = await rig.agent.run_task(request)
        assert rig.env.live == 0 and rig.env.created == 3  # the replayed one was discarded
    assert "cannot resume" in caplog.text and "observation differs" in caplog.text
    assert backend.calls[task.task_id] - 3 == scratch_calls  # started over
    trajectory = response.trajectory
    assert not trajectory.resumptions
    assert trajectory.messages[0].content == SYSTEM_PROMPT
    assert _responses(trajectory) == _responses(baseline.trajectory)
    assert response.result.reward == baseline.result.reward


async def test_a_stale_attempt_has_its_checkpoint_refused_and_stops(tmp_path: Path) -> None:
    task = generate_task(0, 5)
    backend = CountingBackend(hold_at=1, block_at=2)
    async with Rig(tmp_path, backend) as rig:
        await rig.ledger.add_tasks("run", [task])
        first = asyncio.create_task(rig.attempt(task, 1))
        async with asyncio.timeout(30):
            while await rig.ledger.load_checkpoint(task.task_id) is None:
                await asyncio.sleep(0.01)
        # the scheduler presumed attempt 1 dead and started attempt 2
        await rig.ledger.mark_running(task.task_id, 2, f"{task.task_id}#2")
        backend.release.set()  # attempt 1 completes turn 2: its checkpoint is refused
        with pytest.raises(StaleAttemptError, match="no longer current"):
            async with asyncio.timeout(30):
                await first
        assert rig.agent.writer is not None and rig.agent.writer.refused == 1
        assert backend.calls[task.task_id] == 3  # stopped while waiting on its 3rd call
        assert rig.env.live == 0
        stored = await rig.ledger.load_checkpoint(task.task_id)
        assert stored is not None and stored.attempt_id == f"{task.task_id}#1" and stored.seq == 1


async def test_stopping_the_service_flushes_the_checkpoint_and_the_attempt_is_retryable(
    tmp_path: Path,
) -> None:
    task = generate_task(0, 7)
    backend = CountingBackend(block_at=2)  # the agent is waiting on its third model call
    async with Rig(tmp_path, backend) as rig:
        await rig.ledger.add_tasks("run", [task])
        first = asyncio.create_task(rig.attempt(task, 1))
        async with asyncio.timeout(30):
            while backend.calls[task.task_id] < 3:
                await asyncio.sleep(0.001)
        await rig.agent.stop()  # e.g. the worker is shutting down
        with pytest.raises(ServiceUnavailableError, match="interrupted"):
            await first  # retryable: not scored, not a final cancellation
        stored = await rig.ledger.load_checkpoint(task.task_id)
        assert rig.env.live == 0
    assert stored is not None  # flushed on the way out, inside the coalescing window
    assert common_pb2.AgentCheckpoint.FromString(stored.data).steps == 2


@pytest.mark.parametrize("every", [2, 0])
async def test_checkpoint_interval_is_configurable(tmp_path: Path, every: int) -> None:
    task = generate_task(0, 6)
    backend = CountingBackend(fail_at=3)
    async with Rig(tmp_path, backend, every=every) as rig:
        await rig.ledger.add_tasks("run", [task])
        with pytest.raises(ModelUnavailableError):
            await rig.attempt(task, 1)
        stored = await rig.ledger.load_checkpoint(task.task_id)
    if every == 0:
        assert stored is None and rig.agent.writer is None
        return
    assert stored is not None and stored.seq == 1  # after turn 2, not after turns 1 and 3
    assert common_pb2.AgentCheckpoint.FromString(stored.data).steps == 2


def test_incremental_encoding_equals_the_message_built_whole() -> None:
    """A checkpoint, once resume restores its turns (`expand`), is the trajectory as it
    was; it leaves out the prompt token ids and tool output that repeat the turn before."""
    trajectory = common_pb2.Trajectory(task_id="t", attempt_id="t#2")
    trajectory.resumptions.add(at_turn=1, from_attempt_id="t#1", attempt_id="t#2")
    cache = Encoded()
    context: list[int] = [7, 2**20]
    for n in range(1, 4):
        trajectory.messages.add(role="user", content=f"m{n}")
        turn = trajectory.turns.add(index=n - 1, prompt_token_ids=context, model_version="v")
        turn.completion_token_ids.extend([n, n + 1])
        turn.prompt_delta.add(role="tool", content=f"output of turn {n - 2}" * 50)
        turn.prompt_delta.add(role="user", content="not an observation")
        turn.actions.add(kind="execute", command="ls", observation=f"output of turn {n - 1}" * 50)
        context = [*context, n, n + 1, 100 + n]
        pending = [common_pb2.ChatMessage(role="tool", content=f"obs{n}")]
        mark = Mark(n, pending, 10 * n, n, 1.5 * n, "v")
        trajectory.turns.add(index=n, model_version="a turn not yet complete")
        data = encode(trajectory, mark, cache)
        del trajectory.turns[-1]
        whole = common_pb2.Trajectory()
        whole.CopyFrom(trajectory)
        whole.ClearField("messages")  # rebuilt from the turns on resume
        expected = common_pb2.AgentCheckpoint(
            format=3,
            task_id="t",
            attempt_id="t#2",
            trajectory=whole,
            pending=pending,
            steps=n,
            prompt_tokens=10 * n,
            completion_tokens=n,
            elapsed_s=1.5 * n,
            model_version="v",
        )
        stored = common_pb2.AgentCheckpoint.FromString(data)
        assert len(data) < expected.ByteSize() or n == 1
        check_resumable(stored, "t", max_steps=10)  # restores the turns in place
        assert stored == expected
    assert len(cache.turns) == 3  # each turn serialised once
    assert len(data) < expected.ByteSize() - 2 * 50 * len("output of turn 1")


def test_a_format_2_checkpoint_still_resumes() -> None:
    old = common_pb2.AgentCheckpoint(format=2, task_id="t", attempt_id="t#1", steps=1)
    old.trajectory.task_id = "t"
    old.trajectory.turns.add(index=0, prompt_token_ids=[1, 2])
    check_resumable(old, "t", max_steps=10)
    assert list(old.trajectory.turns[0].prompt_token_ids) == [1, 2]


def test_appended_records_then_the_head_parse_as_the_whole_checkpoint() -> None:
    """What the store returns for a log (its records joined, then the latest head) is the
    checkpoint `encode` builds whole; each write after the first carries only its new
    turns, so the bytes written grow linearly with the turns."""
    trajectory = common_pb2.Trajectory(task_id="t", attempt_id="t#2")
    trajectory.resumptions.add(at_turn=1, from_attempt_id="t#1", attempt_id="t#2")
    cache, log, head, sent = Encoded(), [b""], b"", []
    for n in range(1, 40):
        trajectory.turns.add(index=n - 1, prompt_token_ids=[n] * 50, model_version="v")
        mark = Mark(n, [common_pb2.ChatMessage(role="tool", content=f"o{n}")], n, n, 0.5, "v")
        write = record(trajectory, mark, cache)
        assert write.after == (n - 1 if n > 1 else 0)
        log = [write.data] if write.after == 0 else [*log, write.data]
        head = write.head
        sent.append(len(write.data))
        write.stored()
        assert common_pb2.AgentCheckpoint.FromString(
            b"".join(log) + head
        ) == common_pb2.AgentCheckpoint.FromString(encode(trajectory, mark, Encoded()))
    assert max(sent[1:]) < 2 * min(sent[1:])  # one turn each, not the whole history
    write.lost()  # a write that failed: the next one is whole again
    assert record(trajectory, mark, cache).after == 0


@pytest.mark.parametrize(
    ("command", "pure"),
    [
        ("cat pkg/a.py", True),
        ("grep -rn --include='*.py' 'def f(' .", True),
        ("ls -la", True),
        ("cat a > b", False),
        ("cat a | tee b", False),
        ("cat a; rm b", False),
        ("cat $(rm -rf x)", False),
        ("cat `rm x`", False),
        ("cd pkg", False),
        ("python3 -m unittest", False),
        ("sed -i s/a/b/ f", False),
        ("cat 'unclosed", False),
    ],
)
def test_only_plain_reads_are_skipped_by_replay(command: str, pure: bool) -> None:
    assert is_pure_read(command) is pure
