"""The shared jitter of the services' retry loops (megaflow.core.jitter)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megaflow.core import jitter


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    was = jitter.enabled()
    jitter.set_enabled(True)
    jitter.reseed(1)
    yield
    jitter.set_enabled(was)
    jitter.reseed()


def test_full_jitter_backoff_stays_under_its_doubling_capped_ceiling_and_resets() -> None:
    backoff = jitter.Backoff(0.25, 2.0, floor=0.05)
    waits = [backoff.next() for _ in range(40)]
    ceilings = [min(2.0, 0.25 * 2**n) for n in range(40)]
    assert all(0.05 <= w <= c for w, c in zip(waits, ceilings, strict=True)), waits
    assert len({round(w, 6) for w in waits}) > 30  # drawn, not a fixed schedule
    backoff.reset()
    assert backoff.next() <= 0.25


def test_two_processes_worth_of_backoffs_are_not_in_step() -> None:
    # 200 registrants that failed together: with jitter their 4th retries spread over
    # the ceiling; without it they all come back at the same instant
    def fourth_retry_times() -> list[float]:
        times = []
        for _ in range(200):
            backoff, at = jitter.Backoff(0.25, 2.0), 0.0
            for _ in range(4):
                at += backoff.next()
            times.append(at)
        return times

    spread = fourth_retry_times()
    assert max(spread) - min(spread) > 1.5
    jitter.set_enabled(False)
    assert set(fourth_retry_times()) == {0.25 + 0.5 + 1.0 + 2.0}


def test_spread_never_waits_longer_than_the_period() -> None:
    waits = [jitter.spread(2.0, 0.25) for _ in range(1000)]
    assert 1.5 <= min(waits) and max(waits) <= 2.0 and max(waits) - min(waits) > 0.4
    assert jitter.spread(0.0) == 0.0 and jitter.full(-1.0) == 0.0


def test_a_bad_backoff_is_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        jitter.Backoff(-1.0, 1.0)
