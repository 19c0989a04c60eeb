"""Checkpoints of agent state, written to the store as a task runs, and what resume needs.

After every `CheckpointConfig.every_turns` completed turns an agent *marks* its state
(a few counters and a reference to its pending messages: nothing is copied on the
hot path) and offers itself to the service's `CheckpointWriter`. The writer keeps
only the latest offer of each agent (offers coalesce while a write is in flight or
during the `coalesce_s` gathering window), encodes it off the agent's path and writes
batches of them with `TaskLedger.save_checkpoint`, which the store group-commits.

Encoding is incremental: a completed turn never changes, so each is serialised once
and cached; a checkpoint is the cached turns joined (protobuf repeated fields
concatenate on the wire) plus a small header. The conversation (`messages`) is left
out: it is the turns' prompt deltas and responses, rebuilt on resume.

Writes are incremental too (`CheckpointConfig.append`): the store keeps a checkpoint as
a log of records plus a head (`TaskLedger.save_checkpoint`). An attempt's first write
is a whole one (its trajectory so far as one record); each later write appends only
the turns completed since (a `trajectory` field holding just them) and replaces the
head (the counters and pending messages). Joined, the records then the head parse as
the whole `AgentCheckpoint` (protobuf merges repeated `trajectory` fields by appending
their turns; the head's scalars come once). So a task sends O(turns) bytes to the store
over its life, not O(turns²). A write that failed or was refused for another reason
than fencing is followed by a whole one (the log might not be what the writer thinks).

A write the store refuses means the attempt is no longer the task's current one (the
scheduler moved on): the writer tells the agent, which stops with
`StaleAttemptError`. A write that fails (store down, timeout) is logged and skipped:
the task keeps running, with an older checkpoint to resume from.

Resume replays the checkpoint while the scaffold runs again (`megaflow.agent.replay`):
the recorded environment actions that can change state are re-applied to a fresh
environment, each observation verified; what they are does not depend on the scaffold.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InfrastructureError, MegaFlowError
from megaflow.store.ledger import TaskLedger
from megaflow.v1 import common_pb2

log = logging.getLogger(__name__)

FORMAT = 3  # 2: turns carry their environment actions (SessionAction); 3: compacted turns
FORMATS = (2, 3)  # what resume reads
REPLAY = "replay"


class CheckpointConfig(BaseModel):
    """How an Agent Service checkpoints its agents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    every_turns: int = Field(
        default=1, ge=0, description="Checkpoint after every N completed turns; 0 = off."
    )
    write_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline of one batch of checkpoint writes."
    )
    flush_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long an agent failing with an error waits for its latest checkpoint "
        "to be durable before it reports the error (so the next attempt resumes from it).",
    )
    max_batch: int = Field(
        default=256, ge=1, description="Most checkpoints encoded and written per batch."
    )
    append: bool = Field(
        default=True,
        description="Append each checkpoint's new turns to the stored log (False: rewrite the "
        "whole checkpoint every time, O(turns^2) bytes over a task).",
    )
    coalesce_s: float = Field(
        default=0.1,
        ge=0,
        description="How long the writer gathers offers before writing a batch: fewer, larger "
        "store transactions (an agent failing with an error flushes at once).",
    )


class StaleAttemptError(InfrastructureError):
    """The store refused this attempt's checkpoint: another attempt (or the result) owns the
    task now. Whatever this attempt would report is discarded by the scheduler."""


class ReplayMismatch(Exception):
    """A recorded action did not reproduce its recorded observation."""


@dataclass(slots=True)
class Mark:
    """An agent's state at the end of a turn (a count into its append-only trajectory)."""

    turns: int
    pending: list[common_pb2.ChatMessage]
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float
    model_version: str


@dataclass(slots=True)
class Encoded:
    """Serialised turns of a trajectory, each encoded once (a finished turn never changes),
    and what of them the store holds: `logged` turns in a log of `records` records
    (0: nothing known to be stored, the next write is a whole one)."""

    turns: list[bytes] = field(default_factory=list)
    logged: int = 0
    records: int = 0


@dataclass(slots=True)
class Record:
    """One checkpoint write: `data` is the whole log (`after` 0) or the record appended
    to a log of `after` records; `head` replaces the head."""

    data: bytes
    head: bytes
    after: int
    turns: int  # the trajectory's turns the log holds once this is written
    cache: Encoded

    def stored(self) -> None:
        self.cache.logged, self.cache.records = self.turns, self.after + 1

    def lost(self) -> None:
        """Not stored, or maybe stored: the next write is a whole one."""
        self.cache.logged = self.cache.records = 0


class Checkpointable(Protocol):
    """What the writer needs of an agent."""

    @property
    def task_id(self) -> str: ...

    @property
    def attempt_id(self) -> str: ...

    def checkpoint_record(self, append: bool) -> Record: ...

    def on_stale(self) -> None: ...


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (a message or bytes) on the wire."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first items `a` and `b` have in common."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def compact(turn: common_pb2.Turn, before: common_pb2.Turn | None) -> common_pb2.Turn:
    """`turn` as a checkpoint holds it: without what repeats `before` (the turn before
    it): the prompt's first token ids, as many as it shares with `before`'s prompt then
    completion, and tool
    output that is one of `before`'s actions' observations (see `expand`)."""
    if before is None:
        return turn
    out = common_pb2.Turn()
    out.CopyFrom(turn)
    prefix = [*before.prompt_token_ids, *before.completion_token_ids]
    reused = _shared(prefix, turn.prompt_token_ids)
    if reused:  # the context so far, less what the chat template renders differently
        del out.prompt_token_ids[:reused]
        out.reused_prompt_ids = reused
    observations = {a.observation: i for i, a in enumerate(before.actions) if a.observation}
    found = [observations.get(m.content, -1) + 1 if m.content else 0 for m in turn.prompt_delta]
    if any(found):
        out.observation_of.extend(found)
        for message, n in zip(out.prompt_delta, found, strict=True):
            if n:
                message.content = ""
    return out


def expand(turns: Sequence[common_pb2.Turn]) -> None:
    """Restore in place what `compact` left out of each turn."""
    before: common_pb2.Turn | None = None
    for turn in turns:
        if turn.reused_prompt_ids or turn.observation_of:
            if before is None or turn.reused_prompt_ids > len(before.prompt_token_ids) + len(
                before.completion_token_ids
            ):
                raise ReplayMismatch(f"turn {turn.index} refers to a turn the checkpoint lacks")
            if turn.reused_prompt_ids:
                prefix = [*before.prompt_token_ids, *before.completion_token_ids]
                ids = [*prefix[: turn.reused_prompt_ids], *turn.prompt_token_ids]
                turn.ClearField("prompt_token_ids")
                turn.prompt_token_ids.extend(ids)
            for message, n in zip(turn.prompt_delta, turn.observation_of, strict=False):
                if n:
                    if n > len(before.actions):
                        raise ReplayMismatch(f"turn {turn.index}: no action {n - 1} before it")
                    message.content = before.actions[n - 1].observation
            turn.reused_prompt_ids = 0
            turn.ClearField("observation_of")
        before = turn


def _head(trajectory: common_pb2.Trajectory, mark: Mark) -> bytes:
    """The `AgentCheckpoint` fields other than its trajectory."""
    return common_pb2.AgentCheckpoint(
        format=FORMAT,
        task_id=trajectory.task_id,
        attempt_id=trajectory.attempt_id,
        pending=mark.pending,
        steps=mark.turns,
        prompt_tokens=mark.prompt_tokens,
        completion_tokens=mark.completion_tokens,
        elapsed_s=mark.elapsed_s,
        model_version=mark.model_version,
    ).SerializeToString()


def record(
    trajectory: common_pb2.Trajectory, mark: Mark, cache: Encoded, *, append: bool = True
) -> Record:
    """The write that brings the stored checkpoint to `trajectory` as it was at `mark`:
    the turns since the last stored write appended (`append` and the log is known), or
    the whole trajectory."""
    turns = trajectory.turns
    for i in range(len(cache.turns), mark.turns):
        turn = compact(turns[i], turns[i - 1] if i else None)
        cache.turns.append(_field(4, turn.SerializeToString()))
    head = _head(trajectory, mark)
    if append and cache.records and cache.logged <= mark.turns:
        body = b"".join(cache.turns[cache.logged : mark.turns])
        return Record(_field(4, body), head, cache.records, mark.turns, cache)
    top = common_pb2.Trajectory(task_id=trajectory.task_id, attempt_id=trajectory.attempt_id)
    top.resumptions.extend(trajectory.resumptions)
    body = b"".join((top.SerializeToString(), *cache.turns[: mark.turns]))
    return Record(_field(4, body), head, 0, mark.turns, cache)


def encode(trajectory: common_pb2.Trajectory, mark: Mark, cache: Encoded) -> bytes:
    """The whole `AgentCheckpoint` of `trajectory` as it was at `mark`, serialised.

    `trajectory.messages` is left out: it is the turns' prompt deltas and responses in
    order (`conversation`), rebuilt on resume, so a checkpoint is about half the size."""
    whole = record(trajectory, mark, Encoded(cache.turns), append=False)
    return whole.data + whole.head


def conversation(turns: Sequence[common_pb2.Turn]) -> list[common_pb2.ChatMessage]:
    """The conversation the turns make: each turn's prompt delta, then its response."""
    messages: list[common_pb2.ChatMessage] = []
    for turn in turns:
        messages.extend(turn.prompt_delta)
        messages.append(turn.response)
    return messages


_READS = frozenset({"cat", "ls", "grep", "head", "tail", "wc", "pwd", "stat", "diff", "true"})


def is_pure_read(command: str) -> bool:
    """True for a plain read (`cat a b`, `grep -rn x .`): no operators, redirections,
    substitutions or assignments, and a program that changes nothing. Replay skips
    these: they cannot change the environment."""
    if "`" in command or "$(" in command or "\n" in command:
        return False
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return False
    if not words or words[0] not in _READS:
        return False
    return not any(w and set(w) <= set("();<>|&") for w in words)


def check_resumable(checkpoint: common_pb2.AgentCheckpoint, task_id: str, max_steps: int) -> None:
    """ReplayMismatch when `checkpoint` cannot continue `task_id` at all; else its turns
    are restored in place to what the attempt that wrote it had (`expand`)."""
    if checkpoint.format not in FORMATS:
        raise ReplayMismatch(f"checkpoint format {checkpoint.format} (expected one of {FORMATS})")
    if checkpoint.task_id != task_id or checkpoint.trajectory.task_id != task_id:
        raise ReplayMismatch(f"checkpoint is of task {checkpoint.task_id!r}, not {task_id!r}")
    turns = checkpoint.trajectory.turns
    if checkpoint.steps != len(turns) or not turns or len(turns) >= max_steps:
        raise ReplayMismatch(f"checkpoint has {len(turns)} turns (steps={checkpoint.steps})")
    if checkpoint.env_snapshot_uri:
        raise ReplayMismatch("checkpoint needs an environment snapshot; only replay is supported")
    expand(turns)


class CheckpointWriter:
    """Writes the latest checkpoint of each agent that offers one, in the background.

    Batches of up to `max_batch` agents: encoded a few at a time (yielding to the event
    loop between chunks, so that agents' steps are not held up), then written together
    (the store group-commits them). An agent offered again while its write is in flight
    goes into the next batch, so its writes stay in order.
    """

    ENCODE_CHUNK = 16  # checkpoints encoded per event-loop iteration

    def __init__(self, store: TaskLedger, config: CheckpointConfig) -> None:
        self.store = store
        self.config = config
        self._dirty: dict[Checkpointable, None] = {}
        self._inflight: dict[Checkpointable, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.refused = 0
        self.failed = 0
        self.batches = 0
        self.bytes_sent = 0  # checkpoint bytes sent to the store

    def offer(self, agent: Checkpointable) -> None:
        """`agent` has a newer state: write it soon (replacing any unwritten older one)."""
        self._dirty[agent] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="checkpoint-writer"
            )

    def discard(self, agent: Checkpointable) -> None:
        """Forget an unwritten checkpoint of `agent` (its result supersedes it)."""
        self._dirty.pop(agent, None)

    async def flush(self, agent: Checkpointable) -> None:
        """Wait until `agent`'s latest offered checkpoint is written (or failed)."""
        inflight = self._inflight.get(agent)
        if inflight is not None:
            await asyncio.shield(inflight)
        if agent in self._dirty:
            del self._dirty[agent]
            done = self._begin(agent)
            async with asyncio.timeout(self.config.write_timeout_s):
                await self._save(agent, self._encode(agent, done), done, final=True)

    async def close(self) -> None:
        self._dirty.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _begin(self, agent: Checkpointable) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[agent] = done
        return done

    def _end(self, agent: Checkpointable, done: asyncio.Future[None]) -> None:
        if self._inflight.get(agent) is done:
            del self._inflight[agent]
        if not done.done():
            done.set_result(None)

    def _encode(self, agent: Checkpointable, done: asyncio.Future[None]) -> Record | None:
        try:
            return agent.checkpoint_record(self.config.append)
        except Exception:  # a bug must not stop the other agents' checkpoints
            self.failed += 1
            log.exception("checkpoint of %s not encoded", agent.attempt_id)
            self._end(agent, done)
            return None

    async def _drain(self) -> None:
        if self.config.coalesce_s:
            await asyncio.sleep(self.config.coalesce_s)
        while self._dirty:
            batch = list(itertools.islice(self._dirty, self.config.max_batch))
            writes: list[tuple[Checkpointable, Record, asyncio.Future[None]]] = []
            try:
                for i, agent in enumerate(batch):
                    if i and i % self.ENCODE_CHUNK == 0:
                        await asyncio.sleep(0)
                    if agent not in self._dirty:  # flushed or discarded meanwhile
                        continue
                    del self._dirty[agent]
                    done = self._begin(agent)
                    data = self._encode(agent, done)
                    if data is not None:
                        writes.append((agent, data, done))
            except asyncio.CancelledError:
                for agent, _, done in writes:
                    self._end(agent, done)
                raise
            self.batches += 1
            try:  # one deadline for the batch: the store commits it together
                async with asyncio.timeout(self.config.write_timeout_s):
                    await asyncio.gather(*(self._save(a, data, done) for a, data, done in writes))
            except TimeoutError:
                self.failed += len(writes)
                for _, data, _ in writes:
                    data.lost()
                log.warning("%d checkpoints not written in time", len(writes))

    async def _save(
        self,
        agent: Checkpointable,
        data: Record | None,
        done: asyncio.Future[None],
        *,
        final: bool = False,
    ) -> None:
        if data is None:
            return
        try:
            stored = await self._store(agent, data)
        except (MegaFlowError, OSError, TimeoutError, RuntimeError) as error:  # RuntimeError:
            # the store is closed (shutting down)
            self.failed += 1
            data.lost()
            log.warning("checkpoint of %s not written: %s", agent.attempt_id, error)
            return
        except BaseException as error:
            data.lost()  # cancelled (a batch's deadline) or a bug: maybe written
            if not isinstance(error, Exception):
                raise
            self.failed += 1  # a bug must not stop the other agents' checkpoints
            log.exception("checkpoint of %s not written", agent.attempt_id)
            return
        finally:
            self._end(agent, done)
        if stored:
            data.stored()
            self.written += 1
            return
        self.refused += 1  # also a write still in flight when the result was committed
        log.debug("checkpoint of %s refused: the attempt is not current", agent.attempt_id)
        if not final:
            agent.on_stale()

    async def _store(self, agent: Checkpointable, data: Record) -> bool:
        """Write `data`; an append the store refuses is followed by the whole checkpoint
        (the stored log is not the one this writer knows: a refusal of that means fenced)."""
        task_id, attempt_id = agent.task_id, agent.attempt_id
        self.bytes_sent += len(data.data) + len(data.head)
        if await self.store.save_checkpoint(
            task_id, attempt_id, data.data, head=data.head, after=data.after
        ):
            return True
        if not data.after:
            return False
        data.lost()
        whole = agent.checkpoint_record(False)
        self.bytes_sent += len(whole.data) + len(whole.head)
        if await self.store.save_checkpoint(task_id, attempt_id, whole.data, head=whole.head):
            data.after, data.turns = 0, whole.turns
            return True
        return False
