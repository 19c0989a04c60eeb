"""Group commit: calls queued while a batch is in flight go together into the next one.

    batcher = Batcher(flush)          # flush(items) -> one outcome per item
    value = await batcher.submit(item)

``flush`` runs one batch at a time (one transaction, one thread hop, one pipeline);
each caller's future is resolved with its own outcome once the whole batch is done
(committed), so "the call returned" still means "the write is durable". An outcome
that is an exception is raised to that caller alone; an exception from ``flush``
itself (a failed commit) is raised to every caller of the batch.

Callers are answered at most `resolve_chunk` per event-loop iteration. Each answer
wakes its caller in the loop's next iteration, so answering a batch of hundreds at
once would make one iteration run hundreds of continuations: many milliseconds in
which no timer fires and no other task progresses. In chunks, timers and other work
interleave with them; the next batch is flushed meanwhile, not after.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741

Flush = Callable[[list[I]], Awaitable[list[Any]]]


class Failed:
    """An outcome that is an error for its caller alone."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Batcher(Generic[I]):
    def __init__(self, flush: Flush[I], max_batch: int = 0, resolve_chunk: int = 32) -> None:
        """``max_batch``: most items per batch (0: no limit; 1: no coalescing);
        ``resolve_chunk``: most callers answered per event-loop iteration (0: no limit)."""
        self._flush = flush
        self._max_batch = max_batch
        self._resolve_chunk = resolve_chunk
        self._pending: list[tuple[I, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._answers: deque[tuple[asyncio.Future[Any], Any]] = deque()
        self._answering = False
        self.batches = 0
        """Batches flushed so far (a coalescing figure for benchmarks)."""

    async def submit(self, item: I) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def drain(self) -> None:
        """Wait until every queued item has been flushed and its caller answered."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        self._answer(len(self._answers))  # the rest at once

    async def _drain(self) -> None:
        while self._pending:
            cut = self._max_batch or len(self._pending)
            batch, self._pending = self._pending[:cut], self._pending[cut:]
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # skip cancelled
            if not batch:
                continue
            self.batches += 1
            try:
                outcomes = await self._flush([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                for _, fut in self._pending:
                    fut.cancel()
                self._pending = []
                raise
            except Exception as error:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                continue
            self._answers.extend(zip((fut for _, fut in batch), outcomes, strict=True))
            if not self._answering:
                self._answer_some()

    def _answer_some(self) -> None:
        """Answer the next chunk of callers; the rest in the loop's next iteration."""
        self._answer(self._resolve_chunk or len(self._answers))
        self._answering = bool(self._answers)
        if self._answering:
            asyncio.get_running_loop().call_soon(self._answer_some)

    def _answer(self, limit: int) -> None:
        answers = self._answers
        for _ in range(min(limit, len(answers))):
            fut, outcome = answers.popleft()
            if fut.done():
                continue
            if isinstance(outcome, Failed):
                fut.set_exception(outcome.error)
            else:
                fut.set_result(outcome)
