"""Group commit: a batch's callers are answered a chunk per event-loop iteration."""

from __future__ import annotations

import asyncio

from megaflow.store.batching import Batcher, Failed


async def _echo(items: list[int]) -> list[object]:
    await asyncio.sleep(0.01)  # a commit: later submissions queue behind it
    return [Failed(ValueError(str(i))) if i < 0 else i * 10 for i in items]


async def test_a_large_batch_is_answered_a_chunk_per_loop_iteration() -> None:
    batcher: Batcher[int] = Batcher(_echo, resolve_chunk=4)
    woken: list[tuple[int, int]] = []  # (iteration, caller) in the order callers wake
    iteration = 0

    async def tick() -> None:  # counts event-loop iterations
        nonlocal iteration
        while True:
            await asyncio.sleep(0)
            iteration += 1

    async def call(i: int) -> int:
        value: int = await batcher.submit(i)
        woken.append((iteration, i))
        return value

    ticker = asyncio.create_task(tick())
    first = asyncio.create_task(call(0))  # starts a flush; the next 10 queue behind it
    await asyncio.sleep(0)
    values = await asyncio.gather(*(call(i) for i in range(1, 11)))
    await first
    ticker.cancel()
    assert values == [i * 10 for i in range(1, 11)]
    assert batcher.batches == 2
    second = [it for it, i in woken if i >= 1]
    # 10 callers in chunks of 4: three distinct iterations, at most 4 callers in each
    assert len(set(second)) == 3
    assert max(second.count(it) for it in set(second)) == 4


async def test_a_failed_outcome_is_raised_to_its_caller_alone_across_chunks() -> None:
    batcher: Batcher[int] = Batcher(_echo, resolve_chunk=2)
    results = await asyncio.gather(
        *(batcher.submit(i) for i in (1, -2, 3, -4, 5)), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 30 and results[4] == 50
    assert isinstance(results[1], ValueError) and isinstance(results[3], ValueError)


async def test_the_next_batch_is_flushed_while_callers_are_still_being_answered() -> None:
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[object]:
        flushed.append(items)
        await asyncio.sleep(0)
        return list(items)

    batcher: Batcher[int] = Batcher(flush, resolve_chunk=1)
    first = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
    await first[0]  # the first batch is committed and being answered, one an iteration
    assert not first[5].done()
    second = asyncio.ensure_future(batcher.submit(99))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert flushed == [[0, 1, 2, 3, 4, 5], [99]]  # flushed before the first batch is answered
    assert not first[5].done()
    assert await asyncio.gather(*first, second) == [0, 1, 2, 3, 4, 5, 99]


async def test_drain_answers_every_caller() -> None:
    batcher: Batcher[int] = Batcher(_echo, resolve_chunk=1)
    futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.drain()
    await asyncio.sleep(0)  # each caller's task resumes once its future is answered
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40]
