"""The embedded ledger: SQLite in WAL mode, one writer thread, group commit.

Every call runs on a single dedicated thread (sqlite3 connections are not shared
between threads), so the event loop never blocks on disk. Calls made while a
transaction is running are queued and go together into the next transaction: one
thread hop and one fsync per batch, an error (such as a duplicate task id) undoing
that call alone, and each caller answered with its own result after the COMMIT.
``synchronous=FULL``: a call that returned is on disk. A call of one SQL statement
needs no savepoint (SQLite undoes a failed statement by itself); only calls of several
take one. The writer thread runs Python between statements and needs the GIL for it,
which the event loop holds most of the time: fewer statements a call, fewer waits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from megaflow.core.errors import InvalidRequestError
from megaflow.store.batching import Batcher, Failed
from megaflow.store.ledger import (
    TERMINAL_STATES,
    Checkpoint,
    LedgerRow,
    RunRow,
    TaskRow,
    check_append,
    check_lease_args,
    check_new_tasks,
    check_result,
)
from megaflow.v1 import common_pb2

T = TypeVar("T")
Fn = Callable[[sqlite3.Connection], Any]
Op = tuple[Fn, bool]  # (the call, whether it needs a savepoint: several statements)

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
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    seq             INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    total           INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    task_id     TEXT PRIMARY KEY,
    attempt_id  TEXT NOT NULL,
    data        BLOB NOT NULL,
    seq         INTEGER NOT NULL,
    saved_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint_records (
    task_id     TEXT NOT NULL,
    n           INTEGER NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (task_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
"""

# Columns added to `checkpoints` since the first schema (ALTER TABLE on open):
# head: the checkpoint's head; n: records in its log (data = the compacted first ones,
# checkpoint_records the rest, appended since).
_CHECKPOINT_COLUMNS = {
    "head": "BLOB NOT NULL DEFAULT x''",
    "n": "INTEGER NOT NULL DEFAULT 1",
}
_TASK_COLUMNS = {"started_at": "REAL NOT NULL DEFAULT 0"}
COMPACT_RECORDS = 32  # appended records folded into `data` once a log has this many

_NOT_TERMINAL = f"state NOT IN ({TERMINAL_STATES[0]}, {TERMINAL_STATES[1]})"


class SqliteLedger:
    def __init__(self, path: Path | str, *, max_batch: int = 0) -> None:
        """``max_batch``: most calls per transaction (0: no limit; 1: no group commit)."""
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._batcher: Batcher[Op] = Batcher(self._flush, max_batch=max_batch)

    @property
    def transactions(self) -> int:
        """Transactions committed so far by this object (calls coalesce into fewer)."""
        return self._batcher.batches

    # -- plumbing ---------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, several: bool = False) -> T:
        """Run `fn` in the next transaction; `several`: it runs more than one statement
        (a savepoint undoes all of them if it fails)."""
        if self._db is None:
            raise RuntimeError("ledger is not open")
        result: T = await self._batcher.submit((fn, several))
        return result

    async def _flush(self, ops: list[Op]) -> list[Any]:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._commit, ops)

    def _commit(self, ops: list[Op]) -> list[Any]:
        """One transaction for the whole batch; a savepoint for each call of several
        statements."""
        db = self._db
        if db is None:
            raise RuntimeError("ledger is not open")
        outcomes: list[Any] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for fn, several in ops:
                if not several:
                    try:
                        outcomes.append(fn(db))
                    except Exception as error:  # SQLite undid the failed statement
                        outcomes.append(Failed(error))
                    continue
                db.execute("SAVEPOINT op")
                try:
                    value = fn(db)
                except Exception as error:
                    db.execute("ROLLBACK TO op")
                    outcomes.append(Failed(error))
                else:
                    outcomes.append(value)
                db.execute("RELEASE op")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # acknowledged = on disk
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(checkpoints)")}
            for column, kind in _CHECKPOINT_COLUMNS.items():
                if column not in have:  # a ledger from before checkpoint logs
                    db.execute(f"ALTER TABLE checkpoints ADD COLUMN {column} {kind}")
            have = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
            for column, kind in _TASK_COLUMNS.items():
                if column not in have:  # a ledger from before absolute deadlines
                    db.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
            self._db = db

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-ledger")
        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        await self._batcher.drain()
        pool, self._pool = self._pool, None
        if pool is None:
            return

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(pool, shut)
        pool.shutdown(wait=True)

    # -- tasks ------------------------------------------------------------------------

    async def add_tasks(
        self, run_id: str, tasks: list[common_pb2.TaskSpec], *, max_concurrency: int = 0
    ) -> None:
        ids = check_new_tasks(tasks)
        specs = [t.SerializeToString() for t in tasks]

        def add(db: sqlite3.Connection) -> None:
            now = time.time()
            taken: list[str] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                taken += [
                    r[0]
                    for r in db.execute(
                        f"SELECT task_id FROM tasks WHERE task_id IN ({marks})", chunk
                    )
                ]
            if taken:
                raise InvalidRequestError(f"task ids already submitted: {taken[:5]}")
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()
            db.executemany(
                "INSERT INTO tasks (task_id, run_id, seq, spec, state, updated_at) "
                "VALUES (?,?,?,?,?,?)",
                [
                    (i, run_id, seq + n + 1, spec, common_pb2.TASK_STATE_PENDING, now)
                    for n, (i, spec) in enumerate(zip(ids, specs, strict=True))
                ],
            )
            (run_seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()
            db.execute(
                "INSERT INTO runs (run_id, seq, max_concurrency, total) VALUES (?,?,?,?) "
                "ON CONFLICT(run_id) DO UPDATE SET total = total + excluded.total, "
                "max_concurrency = CASE WHEN excluded.max_concurrency > 0 "
                "THEN excluded.max_concurrency ELSE max_concurrency END",
                (run_id, run_seq + 1, max_concurrency, len(ids)),
            )

        await self._call(add, several=True)

    async def mark_running(self, task_id: str, attempt: int, attempt_id: str) -> None:
        now = time.time()
        await self._call(
            lambda db: db.execute(
                "UPDATE tasks SET state=?, attempts=?, attempt_id=?, updated_at=?, "
                "started_at=CASE WHEN ?=1 OR started_at=0 THEN ? ELSE started_at END "
                f"WHERE task_id=? AND {_NOT_TERMINAL}",
                (common_pb2.TASK_STATE_RUNNING, attempt, attempt_id, now, attempt, now, task_id),
            )
        )

    async def mark_retrying(self, task_id: str, attempt: int, error: str) -> None:
        await self._call(
            lambda db: db.execute(
                "UPDATE tasks SET state=?, attempts=?, attempt_id='', error_kind=?, error=?, "
                f"updated_at=? WHERE task_id=? AND {_NOT_TERMINAL}",
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
        check_result(result)
        blob = result.SerializeToString()
        traj = trajectory.SerializeToString() if trajectory is not None else None

        def commit(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE tasks SET state=?, attempts=?, error_kind=?, error=?, result=?, "
                f"trajectory=?, updated_at=? WHERE task_id=? AND {_NOT_TERMINAL}",
                (
                    result.state,
                    result.attempts,
                    result.error_kind,
                    result.error,
                    blob,
                    traj,
                    time.time(),
                    task_id,
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

    async def runs(self) -> list[RunRow]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT r.run_id, r.max_concurrency, r.total, "
                "(SELECT COUNT(*) FROM tasks t WHERE t.run_id = r.run_id "
                f"AND t.state IN ({TERMINAL_STATES[0]}, {TERMINAL_STATES[1]})) "
                "FROM runs r ORDER BY r.seq"
            ).fetchall()
        )
        return [RunRow(run_id=r[0], max_concurrency=r[1], total=r[2], terminal=r[3]) for r in rows]

    async def unfinished(self) -> list[TaskRow]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT run_id, spec, state, attempts, attempt_id, started_at FROM tasks "
                f"WHERE {_NOT_TERMINAL} ORDER BY seq"
            ).fetchall()
        )
        return [
            TaskRow(
                run_id=r[0],
                spec=common_pb2.TaskSpec.FromString(r[1]),
                state=r[2],
                attempts=r[3],
                attempt_id=r[4],
                started_at=r[5],
            )
            for r in rows
        ]

    # -- checkpoints ------------------------------------------------------------------

    async def save_checkpoint(
        self, task_id: str, attempt_id: str, data: bytes, *, head: bytes = b"", after: int = 0
    ) -> bool:
        check_append(after)
        data, head = bytes(data), bytes(head)
        if after:
            return await self._call(
                lambda db: self._append(db, task_id, attempt_id, data, head, after), several=True
            )

        def save(db: sqlite3.Connection) -> bool:
            if not attempt_id:
                return False
            cursor = db.execute(  # stored only while the attempt is current
                "INSERT INTO checkpoints (task_id, attempt_id, data, seq, saved_at, head, n) "
                "SELECT ?,?,?,1,?,?,1 WHERE EXISTS (SELECT 1 FROM tasks WHERE task_id=? AND "
                f"attempt_id=? AND {_NOT_TERMINAL}) ON CONFLICT(task_id) DO UPDATE SET "
                "attempt_id=excluded.attempt_id, data=excluded.data, seq=seq+1, "
                "saved_at=excluded.saved_at, head=excluded.head, n=1",
                (task_id, attempt_id, data, time.time(), head, task_id, attempt_id),
            )
            if cursor.rowcount != 1:
                return False
            db.execute("DELETE FROM checkpoint_records WHERE task_id=?", (task_id,))
            return True

        return await self._call(save, several=True)

    @staticmethod
    def _append(
        db: sqlite3.Connection, task_id: str, attempt_id: str, data: bytes, head: bytes, after: int
    ) -> bool:
        cursor = db.execute(  # fenced, and only onto this attempt's log of `after` records
            "UPDATE checkpoints SET head=?, n=n+1, seq=seq+1, saved_at=? "
            "WHERE task_id=? AND attempt_id=? AND n=? AND EXISTS (SELECT 1 FROM tasks "
            f"WHERE task_id=? AND attempt_id=? AND {_NOT_TERMINAL})",
            (head, time.time(), task_id, attempt_id, after, task_id, attempt_id),
        )
        if cursor.rowcount != 1:
            return False
        db.execute(
            "INSERT INTO checkpoint_records (task_id, n, data) VALUES (?,?,?)",
            (task_id, after + 1, data),
        )
        records = (
            [
                bytes(r[0])
                for r in db.execute(
                    "SELECT data FROM checkpoint_records WHERE task_id=? ORDER BY n", (task_id,)
                ).fetchall()
            ]
            if after % COMPACT_RECORDS == 0
            else []
        )
        if records:  # fold the appended records into the log's first value
            (base,) = db.execute(
                "SELECT data FROM checkpoints WHERE task_id=?", (task_id,)
            ).fetchone()
            db.execute(
                "UPDATE checkpoints SET data=? WHERE task_id=?",
                (bytes(base) + b"".join(records), task_id),
            )
            db.execute("DELETE FROM checkpoint_records WHERE task_id=?", (task_id,))
        return True

    async def load_checkpoint(self, task_id: str) -> Checkpoint | None:
        def load(db: sqlite3.Connection) -> tuple[Any, list[Any]] | None:
            row = db.execute(
                "SELECT attempt_id, data, seq, saved_at, head FROM checkpoints WHERE task_id=?",
                (task_id,),
            ).fetchone()
            if row is None:
                return None
            records = db.execute(
                "SELECT data FROM checkpoint_records WHERE task_id=? ORDER BY n", (task_id,)
            ).fetchall()
            return row, records

        got = await self._call(load)
        if got is None:
            return None
        row, records = got
        data = b"".join([bytes(row[1]), *(bytes(r[0]) for r in records), bytes(row[4])])
        return Checkpoint(attempt_id=row[0], data=data, seq=row[2], saved_at=row[3])

    # -- leases -----------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        check_lease_args(name, holder, ttl_s)

        def acquire(db: sqlite3.Connection) -> bool:
            now = time.time()
            cursor = db.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, "
                "expires_at=excluded.expires_at WHERE holder=excluded.holder OR expires_at<=?",
                (name, holder, now + ttl_s, now),
            )
            return cursor.rowcount == 1

        return await self._call(acquire)

    async def release_lease(self, name: str, holder: str) -> bool:
        check_lease_args(name, holder)
        return await self._call(
            lambda db: (
                db.execute(
                    "DELETE FROM leases WHERE name=? AND holder=? AND expires_at>?",
                    (name, holder, time.time()),
                ).rowcount
                == 1
            )
        )

    async def lease_holder(self, name: str) -> str | None:
        row = await self._call(
            lambda db: db.execute(
                "SELECT holder FROM leases WHERE name=? AND expires_at>?", (name, time.time())
            ).fetchone()
        )
        return None if row is None else str(row[0])
