"""The task ledger interface: every task's state, attempts and outcome, runs,
checkpoints of agent state, and leases.

Three backends implement it identically (one contract suite, ``tests/store``):
:class:`~megaflow.store.sqlite.SqliteLedger` (embedded default),
:class:`~megaflow.store.redis.RedisLedger` and :class:`~megaflow.store.etcd.EtcdLedger`.

Semantics every backend keeps:

- **Acknowledged = durable.** When an awaited write returns, it is on disk (SQLite
  ``synchronous=FULL``; Redis ``appendfsync always``; etcd's fsynced raft log): a
  kill -9 of the store's process afterwards loses nothing.
- ``add_tasks`` rejects an id already submitted (or repeated in the call) with
  :class:`~megaflow.core.errors.InvalidRequestError`; it also records the run: its cap
  (``max_concurrency``, kept from an earlier call when 0) and ``total`` (summed).
- ``mark_running`` / ``mark_retrying`` have no effect on an unknown or terminal task.
  ``mark_running`` of attempt 1 (or of a task never started) records when the task
  started (``TaskRow.started_at``, the store's clock): deadlines count from it, across
  scheduler restarts.
  ``mark_retrying`` clears the current attempt id (the attempt is presumed dead).
- ``finish`` commits a terminal state (SUCCEEDED or FAILED) exactly once: concurrent
  racing calls see exactly one True. False for an unknown or already terminal task.
- ``save_checkpoint`` is *fenced*: stored only while ``attempt_id`` is the task's
  current attempt (set by ``mark_running``) and the task is not terminal, so a worker
  presumed dead cannot overwrite its successor's checkpoint. Each stored checkpoint
  gets the next ``seq`` of its task; ``load_checkpoint`` returns the latest.
- A checkpoint is a *log* of records plus a *head* (both opaque bytes); what
  ``load_checkpoint`` returns is the records joined, then the head. A full save
  (``after=0``) replaces the log with one record; an append (``after=n``) adds a record
  only while the stored checkpoint is this attempt's and its log holds ``n`` records
  (False otherwise: the caller saves a full one), and replaces the head. So a writer
  sends each part of its state once (O(turns) bytes over a task's life, not
  O(turns²)); each backend compacts the records of a log by itself. A checkpoint
  stored before logs existed (one whole value) loads as it was.
- Leases: ``acquire_lease`` is True when the lease was free, expired, or already held
  by ``holder`` (which renews it for ``ttl_s`` more); ``release_lease`` only by the
  holder. Expiry uses the store's clock (etcd rounds ``ttl_s`` up to whole seconds and
  enforces its own minimum TTL).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import common_pb2

TERMINAL_STATES = (common_pb2.TASK_STATE_SUCCEEDED, common_pb2.TASK_STATE_FAILED)


@dataclass(frozen=True)
class LedgerRow:
    run_id: str
    task_id: str
    state: int  # common_pb2.TaskState
    attempts: int
    error_kind: int  # common_pb2.ErrorKind
    error: str
    result: common_pb2.TaskResult | None
    trajectory: common_pb2.Trajectory | None


@dataclass(frozen=True)
class RunRow:
    """One submitted run: its concurrency cap, task count and how many are terminal."""

    run_id: str
    max_concurrency: int
    total: int
    terminal: int


@dataclass(frozen=True)
class TaskRow:
    """A task not yet terminal: what a restarted scheduler needs to re-queue it."""

    run_id: str
    spec: common_pb2.TaskSpec
    state: int  # common_pb2.TaskState: PENDING or RUNNING
    attempts: int
    attempt_id: str  # the current attempt ('' while pending)
    started_at: float = 0.0  # Unix time its first attempt was marked running (0: never)


@dataclass(frozen=True)
class Checkpoint:
    """The latest checkpoint of a task's agent state (opaque bytes)."""

    attempt_id: str
    data: bytes
    seq: int  # 1, 2, ... per task
    saved_at: float  # Unix time


class TaskLedger(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_tasks(
        self, run_id: str, tasks: list[common_pb2.TaskSpec], *, max_concurrency: int = 0
    ) -> None:
        """Record submitted tasks as pending, and the run. Raises InvalidRequestError for a
        duplicate id (nothing is written)."""
        ...

    async def mark_running(self, task_id: str, attempt: int, attempt_id: str) -> None: ...

    async def mark_retrying(self, task_id: str, attempt: int, error: str) -> None:
        """An attempt failed for an infrastructure reason; the task is pending again."""
        ...

    async def finish(
        self,
        task_id: str,
        result: common_pb2.TaskResult,
        trajectory: common_pb2.Trajectory | None,
    ) -> bool:
        """Record the terminal outcome once. False if the task was already terminal."""
        ...

    async def run(self, run_id: str) -> list[LedgerRow]: ...

    async def runs(self) -> list[RunRow]:
        """Every run, in submission order."""
        ...

    async def unfinished(self) -> list[TaskRow]:
        """Every task not yet terminal, in submission order."""
        ...

    async def save_checkpoint(
        self, task_id: str, attempt_id: str, data: bytes, *, head: bytes = b"", after: int = 0
    ) -> bool:
        """Store ``data`` as the task's latest checkpoint if ``attempt_id`` is its current
        attempt and it is not terminal; False (nothing stored) otherwise.

        ``after=0``: ``data`` is the whole log (one record). ``after=n > 0``: ``data`` is
        appended as the log's next record, only if the stored checkpoint is this
        attempt's and its log has ``n`` records. Either way ``head`` replaces the head."""
        ...

    async def load_checkpoint(self, task_id: str) -> Checkpoint | None: ...

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the lease ``name`` for ``ttl_s`` seconds; False if another holds it."""
        ...

    async def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease back; False (nothing changes) unless ``holder`` holds it."""
        ...

    async def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None: free or expired)."""
        ...


def check_new_tasks(tasks: list[common_pb2.TaskSpec]) -> list[str]:
    """The ids of ``tasks``; InvalidRequestError for an empty or repeated id."""
    ids = [t.task_id for t in tasks]
    if any(not i for i in ids):
        raise InvalidRequestError("every task needs a task_id")
    if len(set(ids)) != len(ids):
        twice = [i for i, n in Counter(ids).items() if n > 1]
        raise InvalidRequestError(f"task ids already submitted (repeated): {twice[:5]}")
    return ids


def check_result(result: common_pb2.TaskResult) -> None:
    if result.state not in TERMINAL_STATES:
        raise InvalidRequestError(
            f"finish needs a terminal state (SUCCEEDED or FAILED), got {result.state}"
        )


def check_append(after: int) -> None:
    if after < 0:
        raise InvalidRequestError(f"checkpoint after must be >= 0, got {after}")


def check_lease_args(name: str, holder: str, ttl_s: float | None = None) -> None:
    if not name or not holder:
        raise InvalidRequestError("a lease needs a name and a holder")
    if ttl_s is not None and not ttl_s > 0:
        raise InvalidRequestError(f"lease ttl_s must be > 0, got {ttl_s}")
