"""The garbage-collector policy of long-running services."""

from __future__ import annotations

import asyncio
import gc

from megaflow.core.runtime import GcPauses, GcPolicy, GcTuner


async def test_tuner_turns_automatic_full_collections_off_and_restores_defaults() -> None:
    before = gc.get_threshold()
    tuner = GcTuner(GcPolicy(young_threshold=5_000, full_every_s=0.05))
    tuner.start()
    try:
        young, _, full = gc.get_threshold()
        assert young == 5_000 and full > 10**8  # automatic gen-2 collections never run
        assert gc.get_freeze_count() > 0  # what existed at start-up is not walked again
        await asyncio.sleep(0.2)
        assert tuner.full_collections >= 2  # the periodic full collection replaces them
    finally:
        await tuner.stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_disabled_policy_changes_nothing() -> None:
    before = gc.get_threshold()
    tuner = GcTuner(GcPolicy(enabled=False))
    tuner.start()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
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
