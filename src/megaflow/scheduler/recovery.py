"""What the scheduler's shell reads from and keeps in the store to survive a restart.

- **The scheduler lease** (`hold_lease`, `keep_lease`): one scheduler per store. A new
  scheduler waits for the lease (a killed one's lease expires after its TTL) and gives
  up with a clear error if another scheduler keeps it.
- **Recovery** (`recover`): the runs that still have unfinished tasks, with those tasks
  in submission order. A task the ledger has RUNNING belonged to an attempt whose
  RunTask call died with the old scheduler: it is marked retrying first, which clears
  its current attempt id, so the old attempt (should its agent loop still run) can no
  longer store a checkpoint, and only the new scheduler's attempt can be finished.
- **Deadlines** (`recover`): a task's deadline is absolute: its first start (the ledger
  keeps it, `TaskRow.started_at`) plus its `budgets.task_timeout_s`. A recovered task
  past it ends as the agent ends a task whose deadline passed (FAILED, error kind TASK,
  reward 0), so a task cannot outlive its budget by a scheduler crash. (Tasks without a
  `task_timeout_s` of their own run under the agent's default, which the scheduler does
  not know: the agent's own clock, carried in checkpoints, bounds them.)
- **Replay** (`finished_event`): the TASK_FINISHED event of a terminal ledger row, so a
  watcher (re)connecting gets every result from the ledger, not from memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from megaflow.core.errors import InvalidRequestError, MegaFlowError
from megaflow.store.ledger import LedgerRow, RunRow, TaskLedger, TaskRow
from megaflow.v1 import common_pb2, scheduler_pb2

log = logging.getLogger(__name__)

LEASE = "scheduler"
_FENCE_CHUNK = 1000


def new_holder() -> str:
    """This scheduler's name on the lease: host, process and a random part."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def holder_alive(holder: str) -> bool:
    """Whether the scheduler named `holder` (see `new_holder`) may still be running: False
    only for a process of this host that is gone (e.g. a run killed with SIGKILL, whose
    lease has not expired yet)."""
    host, _, rest = holder.partition("/")
    pid = rest.partition("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def hold_lease(ledger: TaskLedger, holder: str, ttl_s: float, wait_s: float) -> None:
    """Take the scheduler lease, waiting up to `wait_s` for a holder to go (or its lease
    to expire); InvalidRequestError, naming the holder, when it does not."""
    deadline = time.monotonic() + wait_s
    announced = False
    while not await ledger.acquire_lease(LEASE, holder, ttl_s):
        other = await ledger.lease_holder(LEASE)
        if time.monotonic() >= deadline:
            raise InvalidRequestError(
                f"another scheduler ({other}) holds the scheduler lease on this store; "
                f"only one scheduler may use a store (waited {wait_s:.0f} s for its lease "
                "to expire)"
            )
        if not announced:
            log.warning(
                "the scheduler lease is held by %s; waiting up to %.1f s for it to expire",
                other,
                wait_s,
            )
            announced = True
        await asyncio.sleep(min(0.5, ttl_s / 4))
    log.info("holding the scheduler lease as %s (ttl %.1f s)", holder, ttl_s)


async def keep_lease(
    ledger: TaskLedger, holder: str, ttl_s: float, on_lost: Callable[[str], None]
) -> None:
    """Renew the lease every `ttl_s / 4`; call `on_lost` once if another holder has it.
    A store that cannot be reached is retried (the lease may still be ours)."""
    while True:
        await asyncio.sleep(ttl_s / 4)
        try:
            # not asyncio.wait_for: on 3.11 it returns the result when the task is
            # cancelled just as the call completes, and `stop()` then waits forever
            async with asyncio.timeout(ttl_s / 2):
                renewed = await ledger.acquire_lease(LEASE, holder, ttl_s)
        except (MegaFlowError, TimeoutError, OSError) as error:
            log.warning("cannot renew the scheduler lease: %s", error)
            continue
        if not renewed:
            other = await ledger.lease_holder(LEASE)
            on_lost(f"the scheduler lease was taken by {other}")
            return


@dataclass(frozen=True)
class RecoveredRun:
    run: RunRow
    tasks: list[TaskRow]


def past_deadline(row: TaskRow, now: float) -> bool:
    """Whether `row`'s absolute deadline (first start + `task_timeout_s`) has passed."""
    budget = row.spec.budgets.task_timeout_s
    return budget > 0 and row.started_at > 0 and now >= row.started_at + budget


def timed_out(row: TaskRow) -> common_pb2.TaskResult:
    """The outcome of a task whose deadline passed (what the agent reports for one)."""
    budget = row.spec.budgets.task_timeout_s
    return common_pb2.TaskResult(
        task_id=row.spec.task_id,
        state=common_pb2.TASK_STATE_FAILED,
        error_kind=common_pb2.ERROR_KIND_TASK,
        error=f"task deadline of {budget:.0f}s passed (counted from its start, "
        "across a scheduler restart)",
        has_reward=True,
        reward=0.0,
        attempts=row.attempts,
    )


async def recover(ledger: TaskLedger, now: float | None = None) -> list[RecoveredRun]:
    """The runs with unfinished tasks (submission order), their RUNNING tasks fenced;
    tasks past their deadline (at `now`, Unix time) are finished as timed out."""
    runs = await ledger.runs()
    by_run: dict[str, list[TaskRow]] = {}
    expired: list[TaskRow] = []
    now = time.time() if now is None else now
    for row in await ledger.unfinished():
        if past_deadline(row, now):
            expired.append(row)
            continue
        by_run.setdefault(row.run_id, []).append(row)
    running = [row for rows in by_run.values() for row in rows if row.attempt_id]
    running += [row for row in expired if row.attempt_id]
    for i in range(0, len(running), _FENCE_CHUNK):
        await asyncio.gather(
            *(
                ledger.mark_retrying(
                    row.spec.task_id,
                    row.attempts,
                    f"scheduler restarted: attempt {row.attempt_id} abandoned",
                )
                for row in running[i : i + _FENCE_CHUNK]
            )
        )
    for i in range(0, len(expired), _FENCE_CHUNK):
        await asyncio.gather(
            *(
                ledger.finish(row.spec.task_id, timed_out(row), None)
                for row in expired[i : i + _FENCE_CHUNK]
            )
        )
    if expired:
        log.warning("%d recovered tasks were past their deadline: ended as timed out", len(expired))
    out = [RecoveredRun(run, by_run[run.run_id]) for run in runs if run.run_id in by_run]
    if out:
        log.warning(
            "recovered %d unfinished tasks of %d runs from the store (%d were running)",
            sum(len(r.tasks) for r in out),
            len(out),
            len(running),
        )
    return out


def finished_event(run_id: str, row: LedgerRow) -> scheduler_pb2.TaskEvent:
    """The TASK_FINISHED event of a terminal ledger row."""
    result = row.result or common_pb2.TaskResult(
        task_id=row.task_id,
        state=row.state,  # type: ignore[arg-type]
        error_kind=row.error_kind,  # type: ignore[arg-type]
        error=row.error,
        attempts=row.attempts,
    )
    event = scheduler_pb2.TaskEvent(
        type=scheduler_pb2.EVENT_TYPE_TASK_FINISHED,
        run_id=run_id,
        task_id=row.task_id,
        attempt=result.attempts,
        result=result,
        time_unix_s=time.time(),
    )
    if row.trajectory is not None:
        event.trajectory.CopyFrom(row.trajectory)
    return event
