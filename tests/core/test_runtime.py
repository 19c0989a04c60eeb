"""The garbage-collector policy of long-running services."""

from __future__ import annotations

import asyncio
import gc

import pytest

from megaflow.core import runtime
from megaflow.core.runtime import GcPauses, GcPolicy, GcTuner


async def test_tuner_collects_on_a_clock_and_restores_defaults() -> None:
    assert gc.isenabled()
    tuner = GcTuner(GcPolicy(young_every_s=0.01, middle_every=3, full_every_s=0.1))
    tuner.start()
    try:
        assert not gc.isenabled()  # no allocation-triggered collections
        assert gc.get_freeze_count() > 0  # what existed at start-up is not walked again
        await asyncio.sleep(0.35)
        young, middle, full = tuner.collections
        assert young > middle > 0 and full >= 1  # every generation still gets collected
    finally:
        await tuner.stop()
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


async def test_cycles_are_still_reclaimed_under_the_policy() -> None:
    tuner = GcTuner(GcPolicy(young_every_s=0.01, middle_every=2))
    tuner.start()
    try:

        class Node:
            other: object = None

        def make_cycle() -> None:
            a, b = Node(), Node()
            a.other, b.other = b, a

        before = gc.get_count()[0]
        for _ in range(1000):
            make_cycle()
        assert gc.get_count()[0] >= before + 1000  # garbage waiting for the collector
        await asyncio.sleep(0.1)
        assert gc.get_count()[0] < 1000  # the timer collected it
    finally:
        await tuner.stop()


async def test_disabled_policy_changes_nothing() -> None:
    tuner = GcTuner(GcPolicy(enabled=False))
    tuner.start()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    await tuner.stop()


def test_pauses_are_measured() -> None:
    pauses = GcPauses()
    try:
        gc.collect()
    finally:
        pauses.close()
    assert pauses.count >= 1 and pauses.max_s > 0 and pauses.total_s >= pauses.max_s
    gc.collect()
    assert pauses.count == 1  # closed: no longer counting


async def test_a_coarse_timeout_raises_timeout_error_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "COARSE_RESOLUTION_S", 0.05)
    monkeypatch.setattr(runtime, "_COARSE_MIN_S", 0.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with runtime.coarse_timeout(0.1) as scope:
            assert isinstance(scope, runtime.CoarseTimeout)
            await asyncio.sleep(10)
    assert scope.expired()
    assert 0.1 <= loop.time() - started < 5  # at the deadline (up to a slot late), not 10 s


async def test_leaving_a_coarse_timeout_early_keeps_no_timer_per_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "_COARSE_MIN_S", 0.0)
    loop = asyncio.get_running_loop()

    async def work(i: int) -> int:
        async with runtime.coarse_timeout(600.0) as scope:
            await asyncio.sleep(0.01)
        assert not scope.expired()
        return i

    before = len(loop._scheduled)  # type: ignore[attr-defined]
    results = await asyncio.gather(*(work(i) for i in range(500)))
    assert results == list(range(500))
    # 500 deadlines in the same second or two: a handle or two, not 500
    assert len(loop._scheduled) - before <= 3  # type: ignore[attr-defined]


async def test_a_coarse_timeout_does_not_swallow_another_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "COARSE_RESOLUTION_S", 0.05)
    monkeypatch.setattr(runtime, "_COARSE_MIN_S", 0.0)

    async def body() -> None:
        async with runtime.coarse_timeout(0.1):
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.02)
    task.cancel()  # cancelled by someone else before the deadline: stays a cancellation
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_near_deadline_gets_an_exact_asyncio_timeout() -> None:
    async with runtime.coarse_timeout(1.0) as scope:
        assert isinstance(scope, asyncio.Timeout)
