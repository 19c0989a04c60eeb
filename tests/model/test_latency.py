"""The simulated GPU: KV-cache budget, FIFO admission, prefix cache, batch-dependent decode."""

from __future__ import annotations

import asyncio
import time

import pytest

from megaflow.model.latency import GpuLatencyModel, LatencyConfig


async def test_kv_budget_holds_requests_back_even_with_free_slots() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=8, kv_tokens=100, overhead_s=1.0, time_scale=0.05))
    runs = [asyncio.create_task(model.run(40, 10)) for _ in range(3)]  # 50 KV tokens each
    await asyncio.sleep(0)
    assert (model.in_flight, model.queued, model.kv_in_use) == (2, 1, 100)
    results = await asyncio.gather(*runs)
    assert (model.in_flight, model.queued, model.kv_in_use) == (0, 0, 0)
    assert results[2][0] >= 0.05 * 0.8  # the third waited for one to finish
    assert max(q for q, _ in results[:2]) < 0.05 * 0.5


async def test_admission_is_fifo_a_small_request_does_not_jump_the_queue() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=8, kv_tokens=100, overhead_s=1.0, time_scale=0.05))
    first = asyncio.create_task(model.run(60, 0))
    big = asyncio.create_task(model.run(60, 0))  # does not fit next to `first`
    small = asyncio.create_task(model.run(10, 0))  # would fit, but is behind `big`
    await asyncio.sleep(0)
    assert (model.in_flight, model.queued, model.kv_in_use) == (1, 2, 60)
    await first
    await asyncio.sleep(0)
    assert model.kv_in_use == 70 and model.in_flight == 2  # big and small together now
    await asyncio.gather(big, small)


async def test_a_request_larger_than_the_budget_runs_alone() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=4, kv_tokens=100, overhead_s=1.0, time_scale=0.02))
    huge = asyncio.create_task(model.run(500, 0))
    after = asyncio.create_task(model.run(10, 0))
    await asyncio.sleep(0)
    assert (model.in_flight, model.queued, model.kv_in_use) == (1, 1, 500)
    await asyncio.gather(huge, after)
    assert model.kv_in_use == 0


async def test_cancelling_the_blocked_head_admits_the_next() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=4, kv_tokens=100, overhead_s=10.0))
    holder = asyncio.create_task(model.run(60, 0))
    blocked = asyncio.create_task(model.run(60, 0))
    small = asyncio.create_task(model.run(10, 0))
    await asyncio.sleep(0)
    assert model.queued == 2
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)
    await asyncio.sleep(0)
    assert (model.in_flight, model.queued, model.kv_in_use) == (2, 0, 70)
    holder.cancel()
    small.cancel()
    await asyncio.gather(holder, small, return_exceptions=True)
    assert (model.in_flight, model.kv_in_use) == (0, 0)


async def test_kv_budget_caps_the_batch_and_so_utilisation() -> None:
    step = 0.02
    model = GpuLatencyModel(LatencyConfig(slots=4, kv_tokens=100, overhead_s=1.0, time_scale=step))
    await asyncio.gather(*(model.run(100, 0) for _ in range(6)))  # one at a time
    assert model.utilisation() < 0.4
    free = GpuLatencyModel(LatencyConfig(slots=4, overhead_s=1.0, time_scale=step))
    await asyncio.gather(*(free.run(100, 0) for _ in range(8)))  # four at a time
    assert free.utilisation() > 0.7


async def test_prefix_cache_hit_pays_only_for_the_new_suffix() -> None:
    config = LatencyConfig(
        slots=4, prefill_s_per_token=0.001, decode_s_per_token=0.0, prefix_cache_tokens=10_000
    )
    model = GpuLatencyModel(config)
    _, miss = await model.run(300, 10, prefix_key="task-1")
    # The next turn's prompt is the last prompt + its completion (310) + 5 new tokens.
    _, hit = await model.run(315, 10, prefix_key="task-1")
    assert hit < miss / 2
    assert model.prefix_hit_rate() == pytest.approx(0.5)
    assert model.prefix_token_hit_rate() == pytest.approx(310 / (300 + 315))
    await model.run(50, 0, prefix_key="task-2")  # another task: a miss
    assert model.prefix_hit_rate() == pytest.approx(1 / 3)
    await model.run(50, 0)  # no key: not counted
    assert model.prefix_hit_rate() == pytest.approx(1 / 3)
    assert model.service_time(315, 10, cached_tokens=310) == pytest.approx(0.005)


async def test_prefix_cache_is_lru_bounded_in_tokens() -> None:
    model = GpuLatencyModel(LatencyConfig(time_scale=0, prefix_cache_tokens=250))
    for key in ("a", "b"):
        await model.run(100, 10, prefix_key=key)
    await model.run(110, 0, prefix_key="a")  # hit: "a" is now the most recent
    await model.run(100, 10, prefix_key="c")  # evicts "b", the least recently used
    assert model.prefix_cached_tokens <= 250
    hits = model.prefix_hit_rate() * 4
    await model.run(120, 0, prefix_key="b")
    assert model.prefix_hit_rate() * 5 == pytest.approx(hits)  # "b" missed
    await model.run(120, 0, prefix_key="c")
    assert model.prefix_hit_rate() * 6 == pytest.approx(hits + 1)  # "c" hit
    off = GpuLatencyModel(LatencyConfig(time_scale=0))
    await off.run(100, 10, prefix_key="a")
    await off.run(110, 10, prefix_key="a")
    assert off.prefix_hit_rate() == 0.0


def test_decode_slows_mildly_as_the_batch_fills() -> None:
    model = GpuLatencyModel(
        LatencyConfig(
            slots=8, decode_s_per_token=0.01, prefill_s_per_token=0.0, decode_batch_slowdown=0.5
        )
    )
    alone = model.service_time(0, 100, batch=1)
    full = model.service_time(0, 100, batch=8)
    assert alone == pytest.approx(1.0)
    assert full == pytest.approx(1.0 * (1 + 0.5 * 7 / 8))
    flat = GpuLatencyModel(LatencyConfig(slots=8, decode_s_per_token=0.01))
    assert flat.service_time(0, 100, batch=8) == pytest.approx(1.0)


def test_jitter_spreads_service_times_within_bounds_deterministically() -> None:
    def draws(seed: int) -> list[float]:
        model = GpuLatencyModel(LatencyConfig(overhead_s=1.0, jitter=0.25, seed=seed))
        return [model.jitter_factor() for _ in range(1000)]

    first = draws(7)
    assert all(0.75 <= f <= 1.25 for f in first)
    assert min(first) < 0.8 and max(first) > 1.2  # spread over the whole band
    assert draws(7) == first and draws(8) != first  # one seeded sequence per seed
    assert GpuLatencyModel(LatencyConfig()).jitter_factor() == 1.0


async def test_jittered_requests_take_their_drawn_time() -> None:
    config = LatencyConfig(overhead_s=1.0, jitter=0.5, seed=3, time_scale=0.02)
    expected = [GpuLatencyModel(config).jitter_factor()]
    model = GpuLatencyModel(config)
    _, service = await model.run(0, 0)
    assert service >= 0.02 * expected[0] * 0.95


async def test_queues_fifo_beyond_slots() -> None:
    one = 0.05  # seconds per request after scaling
    model = GpuLatencyModel(LatencyConfig(slots=2, overhead_s=1.0, time_scale=one))
    started = time.monotonic()
    runs = [asyncio.create_task(model.run(0, 0)) for _ in range(6)]
    await asyncio.sleep(0)
    assert (model.in_flight, model.queued, model.requests) == (2, 4, 6)
    results = await asyncio.gather(*runs)
    total = time.monotonic() - started
    assert 3 * one * 0.9 <= total < 3 * one * 4
    queues = [q for q, _ in results]
    # FIFO: requests 0-1 start at once, 2-3 after one service time, 4-5 after two.
    assert max(queues[:2]) < one * 0.5
    assert one * 0.8 <= min(queues[2:4]) and max(queues[2:4]) < one * 1.8
    assert one * 1.8 <= min(queues[4:])
    assert all(s >= one * 0.9 for _, s in results)
    assert (model.in_flight, model.queued, model.requests) == (0, 0, 6)


async def test_service_time_is_per_token() -> None:
    config = LatencyConfig(
        slots=1, prefill_s_per_token=0.001, decode_s_per_token=0.01, overhead_s=0.5
    )
    model = GpuLatencyModel(config)
    assert model.service_time(1000, 100) == pytest.approx(0.5 + 1.0 + 1.0)
    assert GpuLatencyModel(config, time_scale=0).config.time_scale == 0
    defaults = LatencyConfig()
    assert (defaults.slots, defaults.prefill_s_per_token, defaults.decode_s_per_token) == (
        64,
        0.0002,
        0.004,
    )
    assert defaults.time_scale == 1.0
    with pytest.raises(ValueError):
        LatencyConfig(slots=0)
    with pytest.raises(ValueError):
        LatencyConfig(slotz=3)  # type: ignore[call-arg]


async def test_utilisation_saturated_and_idle() -> None:
    step = 0.02
    busy = GpuLatencyModel(LatencyConfig(slots=2, overhead_s=1.0, time_scale=step))
    assert busy.utilisation() == 0.0

    async def worker(model: GpuLatencyModel, gap: float) -> None:
        for _ in range(5):
            await model.run(0, 0)
            if gap:
                await asyncio.sleep(gap)

    await asyncio.gather(worker(busy, 0), worker(busy, 0))
    assert busy.utilisation() > 0.85

    idle = GpuLatencyModel(LatencyConfig(slots=2, overhead_s=1.0, time_scale=step))
    await asyncio.gather(worker(idle, step * 2))  # one of two slots, busy a third of the time
    assert idle.utilisation() < 0.4


async def test_utilisation_counts_requests_in_flight() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=1, overhead_s=1.0, time_scale=0.2))
    run = asyncio.create_task(model.run(0, 0))
    await asyncio.sleep(0.05)
    assert model.utilisation() > 0.8
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert model.in_flight == 0


async def test_cancellation_frees_slots_and_queue() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=1, overhead_s=10.0, time_scale=1.0))
    holder = asyncio.create_task(model.run(0, 0))
    waiter = asyncio.create_task(model.run(0, 0))
    await asyncio.sleep(0)
    assert (model.in_flight, model.queued) == (1, 1)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert model.queued == 0
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    assert model.in_flight == 0
    fast = GpuLatencyModel(LatencyConfig(slots=1, time_scale=0))
    queue_s, service_s = await fast.run(10, 10)
    assert queue_s < 0.01 and service_s < 0.01


async def test_thousands_of_concurrent_requests_are_cheap() -> None:
    model = GpuLatencyModel(LatencyConfig(slots=500, overhead_s=1.0, time_scale=0.01))
    started = time.monotonic()
    results = await asyncio.gather(*(model.run(100, 10) for _ in range(5000)))
    elapsed = time.monotonic() - started
    assert elapsed >= 10 * 0.01 * 0.9  # ten waves of 500
    assert elapsed < 5.0
    assert model.requests == 5000 and model.in_flight == 0 and model.queued == 0
    assert max(q for q, _ in results) >= 9 * 0.01 * 0.9
    instant = GpuLatencyModel(LatencyConfig(time_scale=0))
    await asyncio.gather(*(instant.run(1000, 100) for _ in range(10000)))
    assert instant.requests == 10000
