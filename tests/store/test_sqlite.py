"""The SQLite ledger: durable, exactly-once terminal states."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.store.sqlite import SqliteLedger
from megaflow.v1 import common_pb2


def _spec(task_id: str) -> common_pb2.TaskSpec:
    return common_pb2.TaskSpec(task_id=task_id, problem_statement="fix it")


async def test_lifecycle_is_recorded_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.add_tasks("run-1", [_spec("a"), _spec("b")])
    await ledger.mark_running("a", 1, "a#1")
    await ledger.mark_retrying("a", 1, "sandbox died")
    await ledger.mark_running("a", 2, "a#2")
    result = common_pb2.TaskResult(
        task_id="a", state=common_pb2.TASK_STATE_SUCCEEDED, has_reward=True, reward=1.0, attempts=2
    )
    trajectory = common_pb2.Trajectory(task_id="a", messages=[common_pb2.ChatMessage(role="user")])
    assert await ledger.finish("a", result, trajectory) is True
    await ledger.close()

    reopened = SqliteLedger(path)
    await reopened.open()
    rows = {r.task_id: r for r in await reopened.run("run-1")}
    await reopened.close()
    assert rows["a"].state == common_pb2.TASK_STATE_SUCCEEDED
    assert rows["a"].attempts == 2
    assert rows["a"].result == result
    assert rows["a"].trajectory == trajectory
    assert rows["b"].state == common_pb2.TASK_STATE_PENDING


async def test_terminal_state_is_committed_once(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite")
    await ledger.open()
    await ledger.add_tasks("r", [_spec("a")])
    first = common_pb2.TaskResult(task_id="a", state=common_pb2.TASK_STATE_SUCCEEDED, reward=1.0)
    second = common_pb2.TaskResult(task_id="a", state=common_pb2.TASK_STATE_FAILED)
    assert await ledger.finish("a", first, None) is True
    assert await ledger.finish("a", second, None) is False
    (row,) = await ledger.run("r")
    await ledger.close()
    assert row.state == common_pb2.TASK_STATE_SUCCEEDED


async def test_duplicate_task_ids_are_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite")
    await ledger.open()
    await ledger.add_tasks("r1", [_spec("a")])
    with pytest.raises(InvalidRequestError, match="already submitted"):
        await ledger.add_tasks("r2", [_spec("b"), _spec("a")])
    assert await ledger.run("r2") == []
    await ledger.close()


async def test_concurrent_writes_coalesce_into_few_transactions(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite")
    await ledger.open()
    await ledger.add_tasks("r", [_spec(f"t{i}") for i in range(2000)])
    before = ledger.transactions
    await asyncio.gather(*(ledger.mark_running(f"t{i}", 1, f"t{i}#1") for i in range(2000)))
    assert ledger.transactions - before < 100  # 2,000 calls, far fewer commits
    rows = await ledger.run("r")
    await ledger.close()
    assert all(r.state == common_pb2.TASK_STATE_RUNNING and r.attempts == 1 for r in rows)


async def test_each_caller_in_a_batch_gets_its_own_outcome(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite")
    await ledger.open()
    await ledger.add_tasks("r", [_spec("a"), _spec("b")])
    done = common_pb2.TaskResult(state=common_pb2.TASK_STATE_SUCCEEDED)
    outcomes = await asyncio.gather(
        ledger.finish("a", done, None),
        ledger.add_tasks("r2", [_spec("c"), _spec("b")]),  # fails alone: b exists
        ledger.finish("a", done, None),
        ledger.add_tasks("r3", [_spec("d")]),
        ledger.finish("b", done, None),
        return_exceptions=True,
    )
    assert outcomes[0] is True and outcomes[2] is False and outcomes[4] is True
    assert isinstance(outcomes[1], InvalidRequestError) and outcomes[3] is None
    assert [r.task_id for r in await ledger.run("r3")] == ["d"]
    assert await ledger.run("r2") == []  # the failed call's writes were undone, no others
    assert [r.run_id for r in await ledger.runs()] == ["r", "r3"]
    await ledger.close()


async def test_without_group_commit_every_call_is_its_own_transaction(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite", max_batch=1)
    await ledger.open()
    await ledger.add_tasks("r", [_spec(f"t{i}") for i in range(50)])
    before = ledger.transactions
    await asyncio.gather(*(ledger.mark_running(f"t{i}", 1, f"t{i}#1") for i in range(50)))
    assert ledger.transactions - before == 50
    await ledger.close()


async def test_a_ledger_from_before_checkpoint_logs_opens_and_its_checkpoint_loads(
    tmp_path: Path,
) -> None:
    """A ledger file written by the previous schema (a checkpoint as one whole value, no
    first-start time) is migrated on open: its checkpoint loads as it was, appends work
    after the attempt's next whole write, and its tasks read as never started."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.add_tasks("r", [_spec("a")])
    await ledger.mark_running("a", 1, "a#1")
    await ledger.close()
    db = sqlite3.connect(path)  # back to the old schema, with an old whole checkpoint
    db.execute("DROP TABLE checkpoints")
    db.execute("DROP TABLE checkpoint_records")
    db.execute(
        "CREATE TABLE checkpoints (task_id TEXT PRIMARY KEY, attempt_id TEXT NOT NULL, "
        "data BLOB NOT NULL, seq INTEGER NOT NULL, saved_at REAL NOT NULL)"
    )
    db.execute("ALTER TABLE tasks DROP COLUMN started_at")
    db.execute("INSERT INTO checkpoints VALUES ('a', 'a#1', x'00ff01', 4, 1.5)")
    db.commit()
    db.close()
    reopened = SqliteLedger(path)
    await reopened.open()
    try:
        old = await reopened.load_checkpoint("a")
        assert old is not None and (old.data, old.seq, old.attempt_id) == (
            b"\x00\xff\x01",
            4,
            "a#1",
        )
        assert [row.started_at for row in await reopened.unfinished()] == [0.0]
        assert await reopened.save_checkpoint("a", "a#1", b"+", head=b"h", after=1)
        again = await reopened.load_checkpoint("a")
        assert again is not None and again.data == b"\x00\xff\x01+h"
    finally:
        await reopened.close()
