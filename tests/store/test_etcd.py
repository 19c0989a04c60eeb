"""etcd specifics: values over etcd's request-size limit fail fast and clearly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.store.etcd import EtcdLedger
from megaflow.testing.etcd_server import EtcdServer, etcd_available
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    if (why := etcd_available()) is not None:
        pytest.skip(why)
    with EtcdServer() as server:
        yield server


def _huge_trajectory(size: int = 2 << 20) -> common_pb2.Trajectory:
    text = "x" * size  # over etcd's default 1.5 MiB request limit
    return common_pb2.Trajectory(task_id="a", messages=[common_pb2.ChatMessage(content=text)])


async def _ledger(server: EtcdServer, **kwargs: int) -> EtcdLedger:
    ledger = EtcdLedger(server.url, timeout_s=10.0, **kwargs)
    await ledger.open()
    await ledger.add_tasks("r", [common_pb2.TaskSpec(task_id="a", problem_statement="p")])
    return ledger


async def test_an_oversized_trajectory_is_refused_before_sending(etcd: EtcdServer) -> None:
    ledger = await _ledger(etcd)
    try:
        result = common_pb2.TaskResult(task_id="a", state=common_pb2.TASK_STATE_SUCCEEDED)
        with pytest.raises(InvalidRequestError, match="request limit"):
            await asyncio.wait_for(ledger.finish("a", result, _huge_trajectory()), 10)
        with pytest.raises(InvalidRequestError, match="request limit"):
            await ledger.save_checkpoint("a", "a#1", b"x" * (2 << 20))
        (row,) = await ledger.unfinished()  # nothing was written
        assert row.spec.task_id == "a"
        assert await ledger.finish("a", result, None) is True  # a small one still commits
    finally:
        await ledger.close()


@pytest.mark.parametrize(
    "size",
    [
        1_700_000,  # etcd's "request is too large"
        2_200_000,  # past etcd's gRPC message limit (max-request-bytes + 512 KiB)
    ],
)
async def test_the_servers_own_refusal_is_a_clear_error_too(etcd: EtcdServer, size: int) -> None:
    # The ledger believes the limit is larger than the server's: etcd itself refuses.
    ledger = await _ledger(etcd, max_request_bytes=64 << 20)
    try:
        result = common_pb2.TaskResult(task_id="a", state=common_pb2.TASK_STATE_SUCCEEDED)
        with pytest.raises(InvalidRequestError, match="too large"):
            await asyncio.wait_for(ledger.finish("a", result, _huge_trajectory(size)), 10)
        (row,) = await ledger.unfinished()
        assert row.spec.task_id == "a"
    finally:
        await ledger.close()


async def test_a_submission_cut_between_its_transactions_is_never_half_applied(
    etcd: EtcdServer,
) -> None:
    """add_tasks of more tasks than one transaction holds, its caller dying after the
    first chunk is written: another ledger (a restarted scheduler) sees none of the
    submission, its recovery rolls it back, and the same ids can be submitted again."""
    specs = [common_pb2.TaskSpec(task_id=f"t{i}", problem_statement="p") for i in range(100)]
    ledger = EtcdLedger(etcd.url, timeout_s=10.0)
    await ledger.open()
    chunks_written = 0
    crashed = asyncio.Event()
    real_txn = ledger._txn

    async def txn(compare: list[object], success: list[object], failure: list[object]) -> object:
        nonlocal chunks_written
        if crashed.is_set():
            await asyncio.Event().wait()  # the process is gone: nothing more reaches etcd
        reply = await real_txn(compare, success, failure)
        if len(success) >= 4 * 8:  # a chunk of tasks
            chunks_written += 1
            crashed.set()
        return reply

    ledger._txn = txn  # type: ignore[method-assign]
    submitting = asyncio.create_task(ledger.add_tasks("r", specs))
    await asyncio.wait_for(crashed.wait(), 10)
    await asyncio.sleep(0.2)  # the other chunks in flight land or not
    submitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submitting
    await ledger.close()
    assert chunks_written >= 1

    restarted = EtcdLedger(etcd.url, timeout_s=10.0)
    await restarted.open()
    try:
        assert await restarted.run("r") == []  # hidden before recovery
        assert await restarted.runs() == []
        assert await restarted.unfinished() == []  # and rolled back by it
        await restarted.add_tasks("r", specs)  # the same ids again: accepted
        assert [row.spec.task_id for row in await restarted.unfinished()] == [
            s.task_id for s in specs
        ]
        (run,) = await restarted.runs()
        assert run.total == 100
    finally:
        await restarted.close()


async def test_a_duplicate_in_a_large_submission_writes_nothing(etcd: EtcdServer) -> None:
    ledger = EtcdLedger(etcd.url, timeout_s=10.0)
    await ledger.open()
    try:
        await ledger.add_tasks("r", [common_pb2.TaskSpec(task_id="t77")])
        specs = [common_pb2.TaskSpec(task_id=f"t{i}") for i in range(100)]
        with pytest.raises(InvalidRequestError, match="t77"):
            await ledger.add_tasks("r", specs)
        assert [row.task_id for row in await ledger.run("r")] == ["t77"]
        (run,) = await ledger.runs()
        assert run.total == 1
    finally:
        await ledger.close()
