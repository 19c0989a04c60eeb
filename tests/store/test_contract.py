"""The store contract: one suite, run against sqlite, redis and etcd (real servers)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaflow.core.errors import InfrastructureError, InvalidRequestError
from megaflow.testing.processes import kill_group, spawn
from megaflow.v1 import common_pb2
from tests.store import durable_writer
from tests.store.conftest import Backend

REPO = Path(__file__).resolve().parents[2]


def _spec(task_id: str, text: str = "fix it") -> common_pb2.TaskSpec:
    return common_pb2.TaskSpec(task_id=task_id, problem_statement=text)


def _result(task_id: str, reward: float = 1.0, attempts: int = 1) -> common_pb2.TaskResult:
    return common_pb2.TaskResult(
        task_id=task_id,
        state=common_pb2.TASK_STATE_SUCCEEDED,
        has_reward=True,
        reward=reward,
        attempts=attempts,
    )


async def test_lifecycle_is_recorded_and_survives_reopen(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("run-1", [_spec("a"), _spec("b")])
    await ledger.mark_running("a", 1, "a#1")
    await ledger.mark_retrying("a", 1, "sandbox died")
    await ledger.mark_running("a", 2, "a#2")
    result = _result("a", attempts=2)
    trajectory = common_pb2.Trajectory(task_id="a", messages=[common_pb2.ChatMessage(role="user")])
    assert await ledger.finish("a", result, trajectory) is True
    await ledger.close()

    reopened = await backend.ledger()
    rows = await reopened.run("run-1")
    assert [r.task_id for r in rows] == ["a", "b"]
    a, b = rows
    assert (a.state, a.attempts, a.result, a.trajectory) == (
        common_pb2.TASK_STATE_SUCCEEDED,
        2,
        result,
        trajectory,
    )
    assert (b.state, b.attempts, b.result, b.trajectory) == (
        common_pb2.TASK_STATE_PENDING,
        0,
        None,
        None,
    )
    assert await reopened.run("no-such-run") == []


async def test_a_retry_is_recorded_as_infrastructure(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    await ledger.mark_running("a", 1, "a#1")
    await ledger.mark_retrying("a", 1, "host lost")
    (row,) = await ledger.run("r")
    assert (row.state, row.attempts, row.error_kind, row.error) == (
        common_pb2.TASK_STATE_PENDING,
        1,
        common_pb2.ERROR_KIND_INFRA,
        "host lost",
    )


async def test_duplicate_ids_are_rejected_and_nothing_is_written(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r1", [_spec("a")], max_concurrency=3)
    # the duplicate comes last, after more tasks than one etcd transaction holds
    many = [_spec(f"b{i}") for i in range(150)] + [_spec("a")]
    with pytest.raises(InvalidRequestError, match="already submitted"):
        await ledger.add_tasks("r2", many)
    with pytest.raises(InvalidRequestError, match="already submitted"):
        await ledger.add_tasks("r3", [_spec("c"), _spec("c")])
    assert await ledger.run("r2") == []
    assert await ledger.run("r3") == []
    assert [r.run_id for r in await ledger.runs()] == ["r1"]
    assert [t.spec.task_id for t in await ledger.unfinished()] == ["a"]
    await ledger.add_tasks("r2", many[:-1])  # the same ids are free to submit afterwards
    assert len(await ledger.run("r2")) == 150


async def test_finish_commits_exactly_once_under_racing_calls(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    await ledger.mark_running("a", 1, "a#1")
    results = [_result("a", reward=float(i)) for i in range(20)]
    won = await asyncio.gather(*(ledger.finish("a", r, None) for r in results))
    assert won.count(True) == 1
    winner = results[won.index(True)]
    (row,) = await ledger.run("r")
    assert row.result == winner
    failed = common_pb2.TaskResult(task_id="a", state=common_pb2.TASK_STATE_FAILED)
    assert await ledger.finish("a", failed, None) is False
    assert await ledger.finish("unknown", failed, None) is False


async def test_terminal_tasks_stay_terminal(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    with pytest.raises(InvalidRequestError, match="terminal state"):
        await ledger.finish("a", common_pb2.TaskResult(state=common_pb2.TASK_STATE_RUNNING), None)
    assert await ledger.finish("a", _result("a"), None) is True
    await ledger.mark_running("a", 2, "a#2")  # a late dispatch does not resurrect it
    await ledger.mark_retrying("a", 2, "late")
    await ledger.mark_running("nobody", 1, "x")  # unknown ids: no effect, no error
    (row,) = await ledger.run("r")
    assert (row.state, row.attempts) == (common_pb2.TASK_STATE_SUCCEEDED, 1)
    assert await ledger.unfinished() == []


async def test_runs_and_unfinished_rebuild_state_after_reopen(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks(
        "r1", [_spec("a", "A"), _spec("b", "B"), _spec("c", "C")], max_concurrency=2
    )
    await ledger.add_tasks("r2", [_spec("d", "D")])
    await ledger.add_tasks("r1", [_spec("e", "E")])  # more tasks for r1; its cap is kept
    await ledger.mark_running("a", 1, "a#1")
    await ledger.mark_running("b", 1, "b#1")
    assert await ledger.finish("b", _result("b"), None)
    await ledger.mark_running("c", 1, "c#1")
    await ledger.mark_retrying("c", 1, "oom")
    await ledger.close()

    reopened = await backend.ledger()
    runs = await reopened.runs()
    assert [(r.run_id, r.max_concurrency, r.total, r.terminal) for r in runs] == [
        ("r1", 2, 4, 1),
        ("r2", 0, 1, 0),
    ]
    rows = await reopened.unfinished()
    assert [(t.run_id, t.spec.task_id, t.state, t.attempts, t.attempt_id) for t in rows] == [
        ("r1", "a", common_pb2.TASK_STATE_RUNNING, 1, "a#1"),
        ("r1", "c", common_pb2.TASK_STATE_PENDING, 1, ""),
        ("r2", "d", common_pb2.TASK_STATE_PENDING, 0, ""),
        ("r1", "e", common_pb2.TASK_STATE_PENDING, 0, ""),
    ]
    assert rows[0].spec == _spec("a", "A")


async def test_checkpoints_are_fenced_by_the_current_attempt(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    assert await ledger.save_checkpoint("a", "a#1", b"early") is False  # not running yet
    assert await ledger.load_checkpoint("a") is None
    await ledger.mark_running("a", 1, "a#1")
    assert await ledger.save_checkpoint("a", "a#1", b"one") is True
    assert await ledger.save_checkpoint("a", "a#0", b"stale") is False
    await ledger.mark_retrying("a", 1, "worker lost")  # a#1 is presumed dead
    assert await ledger.save_checkpoint("a", "a#1", b"zombie") is False
    await ledger.mark_running("a", 2, "a#2")
    assert await ledger.save_checkpoint("a", "a#1", b"zombie") is False
    assert await ledger.save_checkpoint("a", "a#2", b"two\x00\xff" * 100) is True
    before = time.time()
    assert await ledger.save_checkpoint("a", "a#2", b"three") is True
    latest = await ledger.load_checkpoint("a")
    assert latest is not None
    assert (latest.attempt_id, latest.data, latest.seq) == ("a#2", b"three", 3)
    assert latest.saved_at >= before - 1.0
    assert await ledger.finish("a", _result("a", attempts=2), None)
    assert await ledger.save_checkpoint("a", "a#2", b"after the end") is False
    assert await ledger.save_checkpoint("nobody", "x", b"x") is False
    await ledger.close()
    reopened = await backend.ledger()
    assert await reopened.load_checkpoint("a") == latest


async def test_racing_checkpoints_get_distinct_increasing_seqs(backend: Backend) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    await ledger.mark_running("a", 1, "a#1")
    saved = await asyncio.gather(
        *(ledger.save_checkpoint("a", "a#1", str(i).encode()) for i in range(10))
    )
    assert all(saved)
    latest = await ledger.load_checkpoint("a")
    assert latest is not None and latest.seq == 10


async def test_the_first_start_of_a_task_is_kept_across_attempts_and_reopen(
    backend: Backend,
) -> None:
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    assert [row.started_at for row in await ledger.unfinished()] == [0.0]
    before = time.time()
    await ledger.mark_running("a", 1, "a#1")
    (row,) = await ledger.unfinished()
    assert before - 1.0 <= row.started_at <= time.time() + 1.0
    await ledger.mark_retrying("a", 1, "lost")
    await ledger.mark_running("a", 2, "a#2")
    await ledger.close()
    reopened = await backend.ledger()
    assert [r.started_at for r in await reopened.unfinished()] == [row.started_at]


async def test_checkpoint_logs_append_records_compact_and_are_fenced(backend: Backend) -> None:
    """An append adds a record to this attempt's log (and replaces the head); a load
    joins the records then the head, across compactions and a reopen; an append onto a
    log that is not the one the caller knows (another attempt's, another length) or by a
    stale attempt is refused, and a full save starts the log over."""
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a")])
    await ledger.mark_running("a", 1, "a#1")
    assert await ledger.save_checkpoint("a", "a#1", b"r1", head=b"h1", after=1) is False  # no log
    assert await ledger.save_checkpoint("a", "a#1", b"r1\x00", head=b"h1") is True
    records = [b"r1\x00"]
    for n in range(1, 80):  # past two compactions of every backend
        record = f"[{n}]".encode() + b"\x00\xff" * (n % 3)
        assert await ledger.save_checkpoint("a", "a#1", record, head=b"h%d" % n, after=n) is True
        records.append(record)
    latest = await ledger.load_checkpoint("a")
    assert latest is not None
    assert (latest.data, latest.seq) == (b"".join(records) + b"h79", 80)
    assert await ledger.save_checkpoint("a", "a#1", b"x", after=79) is False  # 80 records now
    assert await ledger.save_checkpoint("a", "a#1", b"x", after=81) is False
    await ledger.mark_retrying("a", 1, "worker lost")
    await ledger.mark_running("a", 2, "a#2")
    assert await ledger.save_checkpoint("a", "a#1", b"zombie", after=80) is False
    assert await ledger.save_checkpoint("a", "a#2", b"x", after=80) is False  # a#1's log
    assert await ledger.load_checkpoint("a") == latest
    assert await ledger.save_checkpoint("a", "a#2", b"new", head=b"H") is True
    assert await ledger.save_checkpoint("a", "a#2", b"+1", head=b"H2", after=1) is True
    await ledger.close()
    reopened = await backend.ledger()
    again = await reopened.load_checkpoint("a")
    assert again is not None and (again.attempt_id, again.data) == ("a#2", b"new+1H2")
    with pytest.raises(InvalidRequestError):
        await reopened.save_checkpoint("a", "a#2", b"x", after=-1)


async def test_leases_are_exclusive_renewable_and_released_by_their_holder(
    backend: Backend,
) -> None:
    ledger = await backend.ledger()
    assert await ledger.lease_holder("scheduler") is None
    assert await ledger.acquire_lease("scheduler", "s1", 30.0) is True
    assert await ledger.acquire_lease("scheduler", "s2", 30.0) is False
    assert await ledger.acquire_lease("scheduler", "s1", 30.0) is True  # renew
    assert await ledger.lease_holder("scheduler") == "s1"
    assert await ledger.release_lease("scheduler", "s2") is False
    assert await ledger.lease_holder("scheduler") == "s1"
    assert await ledger.acquire_lease("other", "s2", 30.0) is True  # names are independent
    assert await ledger.release_lease("scheduler", "s1") is True
    assert await ledger.release_lease("scheduler", "s1") is False
    assert await ledger.lease_holder("scheduler") is None
    assert await ledger.acquire_lease("scheduler", "s2", 30.0) is True
    with pytest.raises(InvalidRequestError):
        await ledger.acquire_lease("scheduler", "s2", 0)


async def test_a_lease_expires_unless_renewed(backend: Backend) -> None:
    ledger = await backend.ledger()
    assert await ledger.acquire_lease("worker", "w1", 2.0)
    started = time.monotonic()
    while time.monotonic() - started < 5.0:  # over twice the TTL: renewing keeps it
        assert await ledger.acquire_lease("worker", "w1", 2.0) is True
        assert await ledger.lease_holder("worker") == "w1"
        await asyncio.sleep(0.25)
    deadline = time.monotonic() + 20.0  # etcd's minimum TTL and expiry tick are coarse
    while await ledger.lease_holder("worker") is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.1)
    assert await ledger.release_lease("worker", "w1") is False
    assert await ledger.acquire_lease("worker", "w2", 30.0) is True


def _write_until_acked_then_kill(url: str) -> None:
    """Run the writer child; SIGKILL it once it has printed `acked`."""
    child = spawn(
        [sys.executable, "-m", "tests.store.durable_writer", url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "acked", line + child.stdout.read()
    finally:
        kill_group(child)
        if child.stdout is not None:
            child.stdout.close()


async def test_acknowledged_writes_survive_kill_9(backend: Backend) -> None:
    """A child process writes; once it says `acked`, it and the store's server get SIGKILL."""
    await asyncio.wait_for(asyncio.to_thread(_write_until_acked_then_kill, backend.url), 90)
    await asyncio.to_thread(backend.crash)  # kill -9 of redis-server / etcd, then restart

    ledger = await backend.ledger()
    rows = {r.task_id: r for r in await ledger.run("durable")}
    assert set(rows) == set(durable_writer.TASKS)
    assert rows["d0"].state == common_pb2.TASK_STATE_SUCCEEDED
    assert rows["d0"].result == durable_writer.RESULT
    assert rows["d0"].trajectory == durable_writer.TRAJECTORY
    checkpoint = await ledger.load_checkpoint("d1")
    assert checkpoint is not None
    assert (checkpoint.attempt_id, checkpoint.data) == ("d1#1", durable_writer.CHECKPOINT)
    (run,) = await ledger.runs()
    assert (run.max_concurrency, run.total, run.terminal) == (7, 40, 1)
    assert await ledger.finish("d0", _result("d0"), None) is False  # still exactly once


async def test_an_open_ledger_carries_on_after_its_server_restarts(backend: Backend) -> None:
    """Calls in between fail as retryable errors; once the server is back they succeed."""
    ledger = await backend.ledger()
    await ledger.add_tasks("r", [_spec("a"), _spec("b")])
    await ledger.mark_running("a", 1, "a#1")
    await asyncio.to_thread(backend.crash)
    deadline = time.monotonic() + 30.0
    while True:
        try:
            won = await ledger.finish("a", _result("a"), None)
            break
        except InfrastructureError:
            assert time.monotonic() < deadline, "the ledger never reconnected"
            await asyncio.sleep(0.2)
    assert won is True
    assert await ledger.save_checkpoint("b", "b#1", b"x") is False
    assert [t.spec.task_id for t in await ledger.unfinished()] == ["b"]
