"""The SQLite ledger: durable, exactly-once terminal states."""

from __future__ import annotations

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
