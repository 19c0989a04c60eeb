"""`megaflow serve scheduler --store redis://... | etcd://...` runs on that store."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.store.factory import open_ledger
from megaflow.testing.etcd_server import EtcdServer, etcd_available
from megaflow.testing.processes import ServiceProcess
from megaflow.testing.redis_server import RedisServer, redis_available
from megaflow.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[RedisServer | EtcdServer]:
    why = redis_available() if request.param == "redis" else etcd_available()
    if why is not None:
        pytest.skip(why)
    server: RedisServer | EtcdServer = RedisServer() if request.param == "redis" else EtcdServer()
    with server:
        yield server


async def test_the_scheduler_records_a_submission_in_the_store(
    store: RedisServer | EtcdServer,
) -> None:
    scheduler = ServiceProcess("scheduler", "--listen", "127.0.0.1:0", "--store", store.url)
    scheduler.start()
    try:
        client = SchedulerServiceClient(scheduler.address, timeout_s=10.0)
        try:
            tasks = [
                common_pb2.TaskSpec(task_id=f"s{i}", problem_statement="fix it") for i in range(3)
            ]
            answer = await client.submit_tasks(
                scheduler_pb2.SubmitTasksRequest(tasks=tasks, max_concurrency=2)
            )
        finally:
            await client.close()
    finally:
        scheduler.stop()
    assert list(answer.task_ids) == ["s0", "s1", "s2"]
    ledger = open_ledger(store.url)  # the scheduler is gone; the store has the tasks
    await ledger.open()
    try:
        rows = await ledger.run(answer.run_id)
    finally:
        await ledger.close()
    assert [r.task_id for r in rows] == ["s0", "s1", "s2"]
    assert all(r.state == common_pb2.TASK_STATE_PENDING for r in rows)


def test_a_bad_store_url_is_refused_with_the_accepted_forms() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "megaflow.cli", "serve", "scheduler", "--store", "s3://x/y"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "etcd://HOST:PORT" in run.stderr and "redis://HOST:PORT" in run.stderr
