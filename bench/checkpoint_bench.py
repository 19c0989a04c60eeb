"""Checkpoint bytes of one task over 10, 50 and 200 turns: before (every checkpoint
rewrites the whole history, each turn whole) and after (appended records, turns without
what repeats the turn before), on each store, in the same run.

The agent is synthetic but shaped like a real tool-using one (the simulated SWE
tasks): each turn adds a tool message (~700 B, the previous command's output), a
~30-token answer with logprobs and one `execute` action with ~700 B of output; the
prompt's token ids are the whole context so far (as real turns record them). It is
checkpointed after every turn (`every_turns=1`, the default), each write awaited.

Figures per store and turn count:

- sent: checkpoint bytes sent to the store over the task's life;
- held: what the store holds at the end for the task's checkpoint: SQLite, the pages
  in use (after a WAL checkpoint) above an empty ledger's; Redis, ``MEMORY USAGE`` of
  its keys; etcd, the growth of the database size in use (etcd keeps every revision
  of a key until it is compacted, and MegaFlow's etcd is not auto-compacted).

    python -m bench.checkpoint_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aetcd import rpc  # type: ignore[import-untyped]

from bench.stats import print_table
from megaflow.agent.checkpoint import (
    CheckpointConfig,
    CheckpointWriter,
    Encoded,
    Mark,
    Record,
    record,
)
from megaflow.store.etcd import EtcdLedger
from megaflow.store.ledger import TaskLedger
from megaflow.store.redis import RedisLedger
from megaflow.store.sqlite import SqliteLedger
from megaflow.testing.etcd_server import EtcdServer, etcd_available
from megaflow.testing.redis_server import RedisServer, redis_available
from megaflow.v1 import common_pb2

TURNS = (10, 50, 200)
Held = Callable[[TaskLedger, str], Awaitable[int]]


class Agent:
    """A synthetic agent's trajectory, grown a turn at a time (see the module's text)."""

    def __init__(self, task_id: str, *, whole: bool) -> None:
        self.task_id, self.attempt_id = task_id, f"{task_id}#1"
        self.whole = whole  # before: whole checkpoints of whole turns
        self.trajectory = common_pb2.Trajectory(task_id=task_id, attempt_id=self.attempt_id)
        self.cache = Encoded()
        self.mark: Mark | None = None
        self._context: list[int] = list(range(400))  # system prompt and problem statement

    def turn(self) -> None:
        n = len(self.trajectory.turns)
        turn = self.trajectory.turns.add(index=n, model_version="v1", prompt_tokens=0)
        if n == 0:
            turn.prompt_delta.add(role="system", content="You are a careful engineer. " * 10)
            turn.prompt_delta.add(role="user", content="Fix the failing test. " * 15)
        else:
            before = self.trajectory.turns[n - 1]
            turn.prompt_delta.add(role="tool", content=before.actions[0].observation)
            self._context += [1000 + (n * 7 + i) % 30000 for i in range(180)]  # the tool output
        turn.prompt_token_ids.extend(self._context)
        answer = [2000 + (n * 13 + i) % 30000 for i in range(30)]
        turn.completion_token_ids.extend(answer)
        turn.completion_logprobs.extend(-0.01 * i for i in range(30))
        turn.response.role = "assistant"
        turn.response.content = f"Let me look at part {n} of the code with grep and sed."
        turn.actions.add(
            kind="execute",
            command=f"sed -n {n},{n + 20}p src/module.py",
            exit_code=0,
            observation=f"line {n}: def function_{n}(x):\n    return x * {n}\n" * 16,
        )
        self._context += answer
        self.mark = Mark(n + 1, [], len(self._context), 30 * (n + 1), float(n), "v1")

    def checkpoint_record(self, append: bool) -> Any:
        assert self.mark is not None
        if not self.whole:
            return record(self.trajectory, self.mark, self.cache, append=append)
        # before: the whole checkpoint every time, each turn as it is (format 2)
        body = common_pb2.Trajectory(task_id=self.task_id, attempt_id=self.attempt_id)
        body.turns.extend(self.trajectory.turns[: self.mark.turns])
        head = common_pb2.AgentCheckpoint(
            format=2, task_id=self.task_id, attempt_id=self.attempt_id, steps=self.mark.turns
        ).SerializeToString()
        whole = common_pb2.AgentCheckpoint(trajectory=body).SerializeToString()
        return Record(whole, head, 0, self.mark.turns, Encoded())

    def on_stale(self) -> None:
        raise AssertionError("the bench's attempt is always current")


async def _task(ledger: TaskLedger, task_id: str, turns: int, *, whole: bool) -> tuple[int, int]:
    """Run the synthetic task for `turns` turns, checkpointing each: bytes sent, and how
    many checkpoints the store took (etcd refuses one over its request limit)."""
    await ledger.add_tasks("bench", [common_pb2.TaskSpec(task_id=task_id)])
    await ledger.mark_running(task_id, 1, f"{task_id}#1")
    writer = CheckpointWriter(ledger, CheckpointConfig(append=not whole, coalesce_s=0))
    agent = Agent(task_id, whole=whole)
    for _ in range(turns):
        agent.turn()
        writer.offer(agent)
        await writer.flush(agent)
    await writer.close()
    if writer.written == turns:
        loaded = await ledger.load_checkpoint(task_id)
        assert loaded is not None
        assert common_pb2.AgentCheckpoint.FromString(loaded.data).steps == turns
    return writer.bytes_sent, writer.written


async def _sqlite_held(ledger: TaskLedger, _task_id: str) -> int:
    assert isinstance(ledger, SqliteLedger)

    def used(db: Any) -> int:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    assert ledger._pool is not None
    await ledger._batcher.drain()
    return await asyncio.get_running_loop().run_in_executor(ledger._pool, used, ledger._db)


async def _redis_held(ledger: TaskLedger, task_id: str) -> int:
    assert isinstance(ledger, RedisLedger)
    total = 0
    for kind in ("c", "cl"):
        key = ledger._key(kind, task_id)  # SAMPLES 0: every field of the hash
        total += int(await ledger.client.memory_usage(key, samples=0) or 0)
    return total


async def _etcd_held(ledger: TaskLedger, _task_id: str) -> int:
    assert isinstance(ledger, EtcdLedger)
    client = ledger._client
    reply = await client.maintenancestub.Status(rpc.StatusRequest(), timeout=30)
    return int(reply.dbSizeInUse)


@contextlib.asynccontextmanager
async def _opened(ledger: TaskLedger) -> AsyncIterator[TaskLedger]:
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()


async def _store(
    name: str,
    make: Callable[[str], TaskLedger],
    held: Held,
    turns: tuple[int, ...],
    modes: tuple[str, ...] = ("before", "after"),
) -> list[tuple[str, int, str, int, int]]:
    """(store, turns, mode, sent, held) for each case, each in a fresh ledger."""
    rows = []
    for n in turns:
        for mode in modes:
            async with _opened(make(f"{mode}{n}")) as ledger:
                empty = await held(ledger, "t")
                sent, written = await _task(ledger, "t", n, whole=mode == "before")
                label = mode if written == n else f"{mode} ({n - written} refused: too large)"
                rows.append((name, n, label, sent, await held(ledger, "t") - empty))
    return rows


async def run(quick: bool = False) -> dict[str, float]:
    turns = TURNS[:2] if quick else TURNS
    rows: list[tuple[str, int, str, int, int]] = []
    with tempfile.TemporaryDirectory(prefix="mf-checkpoint-bench-") as folder:
        path = Path(folder)
        rows += await _store(
            "sqlite", lambda tag: SqliteLedger(path / f"{tag}.sqlite"), _sqlite_held, turns
        )
    if redis_available() is None:
        with RedisServer() as server:
            rows += await _store(
                "redis", lambda tag: RedisLedger(server.url, prefix=tag), _redis_held, turns
            )
    if etcd_available() is None:
        for n in turns:  # a fresh etcd per case: the database's size is the measure
            for mode in ("before", "after"):
                with EtcdServer() as etcd:
                    url = etcd.url
                    rows += await _store(
                        "etcd",
                        lambda tag: EtcdLedger(url, prefix=tag),  # noqa: B023 (awaited here)
                        _etcd_held,
                        (n,),
                        (mode,),
                    )
    figures: dict[str, float] = {}
    table: list[tuple[str, ...]] = []
    for store, n, mode, sent, held in rows:
        key = mode.split()[0]
        figures[f"{store}_{n}_{key}_sent_bytes"] = sent
        figures[f"{store}_{n}_{key}_held_bytes"] = held
        table.append((store, str(n), mode, f"{sent / 1024:,.0f}", f"{held / 1024:,.0f}"))
    print_table(
        "Checkpoint bytes of one task, checkpointed every turn",
        table,
        ("store", "turns", "", "sent KiB (life)", "held KiB (end)"),
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_bench")
    parser.add_argument("--quick", action="store_true", help="10 and 50 turns only")
    args = parser.parse_args()
    asyncio.run(run(quick=args.quick))


if __name__ == "__main__":
    main()
