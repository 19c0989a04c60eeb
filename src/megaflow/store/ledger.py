"""The task ledger interface: every task's state, attempts and outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from megaflow.v1 import common_pb2


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


class TaskLedger(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_tasks(self, run_id: str, tasks: list[common_pb2.TaskSpec]) -> None:
        """Record submitted tasks as pending. Raises InvalidRequestError for a duplicate id."""
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
