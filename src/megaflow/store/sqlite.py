"""The embedded ledger: SQLite in WAL mode, one writer thread.

Every call runs on a single dedicated thread (sqlite3 connections are not shared
between threads), so the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from megaflow.core.errors import InvalidRequestError
from megaflow.store.ledger import LedgerRow
from megaflow.v1 import common_pb2

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    spec        BLOB NOT NULL,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    attempt_id  TEXT NOT NULL DEFAULT '',
    error_kind  INTEGER NOT NULL DEFAULT 0,
    error       TEXT NOT NULL DEFAULT '',
    result      BLOB,
    trajectory  BLOB,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_run ON tasks (run_id, seq);
"""

_TERMINAL = (common_pb2.TASK_STATE_SUCCEEDED, common_pb2.TASK_STATE_FAILED)


class SqliteLedger:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-ledger")

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._db is not None, "ledger is not open"
            with self._db:  # one transaction per call
                return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.isolation_level = "DEFERRED"  # transactions per `with db:`
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)

    async def add_tasks(self, run_id: str, tasks: list[common_pb2.TaskSpec]) -> None:
        now = time.time()

        def add(db: sqlite3.Connection) -> None:
            ids = [t.task_id for t in tasks]
            marks = ",".join("?" * len(ids))
            taken = db.execute(
                f"SELECT task_id FROM tasks WHERE task_id IN ({marks})", ids
            ).fetchall()
            if taken:
                raise InvalidRequestError(
                    f"task ids already submitted: {[r[0] for r in taken][:5]}"
                )
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()
            db.executemany(
                "INSERT INTO tasks (task_id, run_id, seq, spec, state, updated_at) "
                "VALUES (?,?,?,?,?,?)",
                [
                    (
                        t.task_id,
                        run_id,
                        seq + i + 1,
                        t.SerializeToString(),
                        common_pb2.TASK_STATE_PENDING,
                        now,
                    )
                    for i, t in enumerate(tasks)
                ],
            )

        await self._call(add)

    async def mark_running(self, task_id: str, attempt: int, attempt_id: str) -> None:
        await self._call(
            lambda db: db.execute(
                "UPDATE tasks SET state=?, attempts=?, attempt_id=?, updated_at=? WHERE task_id=?",
                (common_pb2.TASK_STATE_RUNNING, attempt, attempt_id, time.time(), task_id),
            )
        )

    async def mark_retrying(self, task_id: str, attempt: int, error: str) -> None:
        await self._call(
            lambda db: db.execute(
                "UPDATE tasks SET state=?, attempts=?, error_kind=?, error=?, updated_at=? "
                "WHERE task_id=?",
                (
                    common_pb2.TASK_STATE_PENDING,
                    attempt,
                    common_pb2.ERROR_KIND_INFRA,
                    error,
                    time.time(),
                    task_id,
                ),
            )
        )

    async def finish(
        self,
        task_id: str,
        result: common_pb2.TaskResult,
        trajectory: common_pb2.Trajectory | None,
    ) -> bool:
        def commit(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE tasks SET state=?, attempts=?, error_kind=?, error=?, result=?, "
                "trajectory=?, updated_at=? WHERE task_id=? AND state NOT IN (?, ?)",
                (
                    result.state,
                    result.attempts,
                    result.error_kind,
                    result.error,
                    result.SerializeToString(),
                    trajectory.SerializeToString() if trajectory is not None else None,
                    time.time(),
                    task_id,
                    *_TERMINAL,
                ),
            )
            return cursor.rowcount == 1

        return await self._call(commit)

    async def run(self, run_id: str) -> list[LedgerRow]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT run_id, task_id, state, attempts, error_kind, error, result, trajectory "
                "FROM tasks WHERE run_id=? ORDER BY seq",
                (run_id,),
            ).fetchall()
        )
        return [
            LedgerRow(
                run_id=r[0],
                task_id=r[1],
                state=r[2],
                attempts=r[3],
                error_kind=r[4],
                error=r[5],
                result=common_pb2.TaskResult.FromString(r[6]) if r[6] is not None else None,
                trajectory=common_pb2.Trajectory.FromString(r[7]) if r[7] is not None else None,
            )
            for r in rows
        ]
