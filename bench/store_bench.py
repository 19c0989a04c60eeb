"""Store write rates: N concurrent ``mark_running`` then N ``finish`` (asyncio.gather).

What the scheduler does under load (the 30,000-task benchmark): thousands of small
writes in flight at once, each acknowledged only once durable. Per backend:

- sqlite, one transaction (and one thread hop, one fsync) per call (``max_batch=1``,
  the ledger before group commit) against group commit (calls queued during a
  transaction share the next one);
- redis (``appendfsync always``), concurrent calls over a pool of 32 connections
  (``max_batch=1``) against coalesced pipelines;
- etcd (fewer calls: each is a read plus a compare-and-swap transaction).

Redis and etcd run only where their servers are installed (private servers on
loopback, started and stopped here).

    python -m bench.store_bench [--quick] [--tasks N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.stats import print_table
from megaflow.store.etcd import EtcdLedger
from megaflow.store.ledger import TaskLedger
from megaflow.store.redis import RedisLedger
from megaflow.store.sqlite import SqliteLedger
from megaflow.testing.etcd_server import EtcdServer, etcd_available
from megaflow.testing.redis_server import RedisServer, redis_available
from megaflow.v1 import common_pb2

ETCD_SHARE = 6  # etcd gets 1/6 of the calls (it is ~20x slower per call here)


async def _measure(ledger: TaskLedger, n: int, run_id: str) -> tuple[float, float]:
    """ops/s of n concurrent mark_running, then of n concurrent finish."""
    ids = [f"{run_id}-{i}" for i in range(n)]
    specs = [common_pb2.TaskSpec(task_id=i, problem_statement="fix it") for i in ids]
    await ledger.add_tasks(run_id, specs, max_concurrency=n)
    t0 = time.perf_counter()
    await asyncio.gather(*(ledger.mark_running(i, 1, f"{i}#1") for i in ids))
    running = n / (time.perf_counter() - t0)
    result = common_pb2.TaskResult(state=common_pb2.TASK_STATE_SUCCEEDED, attempts=1)
    t0 = time.perf_counter()
    won = await asyncio.gather(*(ledger.finish(i, result, None) for i in ids))
    finishing = n / (time.perf_counter() - t0)
    assert all(won), "every finish must win once"
    return running, finishing


async def _case(make: Callable[[], TaskLedger], n: int, name: str) -> tuple[float, float]:
    ledger = make()
    await ledger.open()
    try:
        return await _measure(ledger, n, name)
    finally:
        await ledger.close()


async def run(quick: bool = False, tasks: int = 0) -> dict[str, float]:
    n = tasks or (3000 if quick else 30_000)
    figures: dict[str, float] = {}
    rows: list[tuple[str, ...]] = []

    async def record(
        key: str, label: str, count: int, case: Awaitable[tuple[float, float]]
    ) -> None:
        running, finishing = await case
        figures[f"{key}_mark_running_ops_s"] = running
        figures[f"{key}_finish_ops_s"] = finishing
        rows.append((label, f"{count:,}", f"{running:,.0f}", f"{finishing:,.0f}"))

    with tempfile.TemporaryDirectory(prefix="mf-store-bench-") as folder:
        path = Path(folder)
        await record(
            "sqlite_per_call",
            "sqlite, a transaction per call",
            n,
            _case(lambda: SqliteLedger(path / "a.sqlite", max_batch=1), n, "a"),
        )
        await record(
            "sqlite_group",
            "sqlite, group commit",
            n,
            _case(lambda: SqliteLedger(path / "b.sqlite"), n, "b"),
        )
    if redis_available() is None:
        with RedisServer() as server:
            await record(
                "redis_per_call",
                "redis (AOF always), concurrent calls on 32 connections",
                n,
                _case(lambda: RedisLedger(server.url, max_batch=1), n, "a"),
            )
            await record(
                "redis_pipelined",
                "redis (AOF always), coalesced pipelines",
                n,
                _case(lambda: RedisLedger(server.url), n, "b"),
            )
    if etcd_available() is None:
        m = max(100, n // ETCD_SHARE)
        with EtcdServer() as etcd:
            await record("etcd", "etcd", m, _case(lambda: EtcdLedger(etcd.url), m, "a"))
    print_table(
        "Store writes: concurrent calls, each durable when it returns",
        rows,
        ("store", "calls", "mark_running ops/s", "finish ops/s"),
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_bench")
    parser.add_argument("--quick", action="store_true", help="3,000 calls instead of 30,000")
    parser.add_argument("--tasks", type=int, default=0, help="calls per measurement")
    args = parser.parse_args()
    asyncio.run(run(quick=args.quick, tasks=args.tasks))


if __name__ == "__main__":
    main()
