"""The garbage-collector policy of long-running services."""

from __future__ import annotations

import asyncio
import gc

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
