"""Model Service figures: router overhead, routing vs utilisation, stickiness vs prefix
cache, and a hot swap under load. Everything runs on simulated GPUs
(`megaflow.model.latency`) behind the real `ModelServiceImpl` (router, replicas, swap).

`_GpuBackend` is a thin simulated backend that sends exactly the prompt/completion
sizes the benchmark chooses to a `GpuLatencyModel`, with the task id as prefix key.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from bench.stats import ms, print_table, summarise
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.router import ReplicaView, RoutePolicy, Router
from megaflow.model.service import ModelServiceConfig, ModelServiceImpl
from megaflow.v1 import common_pb2, model_pb2

_ANSWER = common_pb2.ChatMessage(role="assistant", content="ok")


class _GpuBackend:
    """A simulated replica: a GPU latency model and a fixed answer."""

    kind = "simulated"

    def __init__(self, latency: LatencyConfig, name: str = "m", version: str = "v1") -> None:
        self.name = name
        self.version = version
        self.latency = GpuLatencyModel(latency)

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        prompt = sum(len(m.content) for m in request.messages) // 4
        completion = request.max_tokens or 16
        queue_s, service_s = await self.latency.run(prompt, completion, request.task_id or None)
        return model_pb2.GenerateResponse(
            message=_ANSWER,
            model=self.name,
            model_version=self.version,
            prompt_tokens=prompt,
            completion_tokens=completion,
            queue_s=queue_s,
            latency_s=queue_s + service_s,
        )

    def stats(self) -> model_pb2.ModelStats:
        return model_pb2.ModelStats(
            utilisation=self.latency.utilisation(),
            in_flight=self.latency.in_flight,
            queued=self.latency.queued,
            requests=self.latency.requests,
        )

    async def close(self) -> None:
        return None


def _chat(task_id: str, prompt_tokens: int, max_tokens: int = 16) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        task_id=task_id,
        model="m",
        max_tokens=max_tokens,
        messages=[common_pb2.ChatMessage(role="user", content="x" * (4 * prompt_tokens))],
    )


def _service(backends: list[_GpuBackend], **config: object) -> ModelServiceImpl:
    service = ModelServiceImpl(backends[:1], config=ModelServiceConfig.model_validate(config))
    for backend in backends[1:]:
        service.add_replica(backend)
    return service


async def _router_overhead(n: int) -> tuple[list[float], list[float]]:
    """Per request: `Router.choose` alone over 8 replicas, and a whole `generate` through
    the service (validate, admit, route, dispatch, tag) to zero-latency replicas."""
    router = Router()
    views = [ReplicaView(id=f"r{i}", in_flight_tokens=i * 100, capacity=64) for i in range(8)]
    choose = []
    for i in range(n):
        t0 = time.perf_counter()
        router.choose(views, task_id=f"t{i % 500}", tokens=300)
        choose.append(time.perf_counter() - t0)
    zero = LatencyConfig(time_scale=0)
    service = _service([_GpuBackend(zero) for _ in range(8)])
    request = _chat("t", 300)
    full = []
    for i in range(n):
        request.task_id = f"t{i % 500}"
        t0 = time.perf_counter()
        await service.generate(request)
        full.append(time.perf_counter() - t0)
    await service.stop()
    return choose, full


async def _closed_loop(
    service: ModelServiceImpl, clients: int, duration_s: float, sizes: list[int]
) -> int:
    """`clients` agents each sending one request after another for `duration_s`."""
    stop_at = time.monotonic() + duration_s
    done = 0

    async def client(c: int) -> None:
        nonlocal done
        rng = random.Random(c)
        while time.monotonic() < stop_at:
            await service.generate(_chat(f"c{c}-{done}", rng.choice(sizes)))
            done += 1

    await asyncio.gather(*(client(c) for c in range(clients)))
    return done


async def _utilisation(policy: RoutePolicy, duration_s: float) -> float:
    """Mean utilisation of 4 replicas x 8 slots, 32 agents, 1 in 10 requests 40x larger."""
    gpu = LatencyConfig(slots=8, prefill_s_per_token=0.0002, decode_s_per_token=0.004,
                        time_scale=0.05)  # fmt: skip
    backends = [_GpuBackend(gpu) for _ in range(4)]
    service = _service(backends, route_policy=policy, sticky=False)
    await _closed_loop(service, 32, duration_s, [100] * 9 + [4000])
    figure = statistics.fmean(b.latency.utilisation() for b in backends)
    await service.stop()
    return figure


async def _prefix_hit_rate(sticky: bool, tasks: int, turns: int) -> float:
    """Agents whose every turn extends the last prompt; 4 replicas with a prefix cache."""
    gpu = LatencyConfig(slots=16, prefix_cache_tokens=400_000, time_scale=0.02)
    backends = [_GpuBackend(gpu) for _ in range(4)]
    service = _service(backends, sticky=sticky)

    async def agent(t: int) -> None:
        rng = random.Random(t)
        prompt = rng.randint(300, 1500)
        for _ in range(turns):
            await service.generate(_chat(f"task-{t}", prompt))
            await asyncio.sleep(rng.uniform(0.0, 0.01))  # the environment step
            prompt += 16 + rng.randint(20, 600)  # last completion + the new observation

    await asyncio.gather(*(agent(t) for t in range(tasks)))
    lookups = sum(b.latency.requests for b in backends)
    hits = sum(b.latency.prefix_hit_rate() * b.latency.requests for b in backends)
    await service.stop()
    return hits / lookups


async def _hot_swap(n: int) -> dict[str, float]:
    """`n` requests from 64 agents; the model moves to a new version halfway."""
    gpu = LatencyConfig(slots=32, time_scale=0.01)
    service = _service([_GpuBackend(gpu) for _ in range(2)])
    gate = asyncio.Semaphore(64)
    failures = 0
    done = 0
    swap_s = 0.0

    async def one(i: int) -> None:
        nonlocal failures, done
        async with gate:
            try:
                await service.generate(_chat(f"t{i % 256}", 200))
            except Exception:
                failures += 1
            done += 1

    async def swap() -> None:
        nonlocal swap_s
        while done < n // 2:  # noqa: ASYNC110 - a progress poll, not a signal
            await asyncio.sleep(0.001)
        new = [_GpuBackend(gpu, version="v2") for _ in range(2)]
        report = await service.deploy_version("m", "v2", new)
        swap_s = report.swap_s

    t0 = time.perf_counter()
    await asyncio.gather(swap(), *(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await service.stop()
    return {"rps": n / elapsed, "failures": float(failures), "swap_s": swap_s}


async def run(quick: bool = False) -> dict[str, float]:
    n = 2000 if quick else 20_000
    duration = 1.5 if quick else 5.0
    choose, full = await _router_overhead(n)
    ll = await _utilisation(RoutePolicy.LEAST_LOADED, duration)
    rr = await _utilisation(RoutePolicy.ROUND_ROBIN, duration)
    p2c = await _utilisation(RoutePolicy.P2C, duration)
    tasks, turns = (32, 6) if quick else (128, 8)
    sticky = await _prefix_hit_rate(True, tasks, turns)
    loose = await _prefix_hit_rate(False, tasks, turns)
    swap = await _hot_swap(1000 if quick else 5000)
    c, f = summarise("choose", choose), summarise("generate", full)
    figures = {
        "router_choose_p50_ms": c["p50"] * 1000,
        "router_choose_p99_ms": c["p99"] * 1000,
        "router_overhead_p50_ms": f["p50"] * 1000,
        "router_overhead_p99_ms": f["p99"] * 1000,
        "utilisation_least_loaded": ll,
        "utilisation_round_robin": rr,
        "utilisation_p2c": p2c,
        "prefix_hit_rate_sticky": sticky,
        "prefix_hit_rate_not_sticky": loose,
        "hot_swap_rps": swap["rps"],
        "hot_swap_failures": swap["failures"],
        "hot_swap_s": swap["swap_s"],
    }
    rows = [
        ("router choose (8 replicas)", ms(c["p50"]), ms(c["p99"]), ""),
        ("generate via service, 0-latency replicas", ms(f["p50"]), ms(f["p99"]), "p99 <= 1 ms"),
        ("utilisation, least-loaded", f"{ll:.1%}", "", f"round-robin {rr:.1%}, p2c {p2c:.1%}"),
        ("prefix-cache hit rate, sticky", f"{sticky:.1%}", "", f"not sticky {loose:.1%}"),
        (
            "hot swap under load",
            f"{swap['rps']:.0f} req/s",
            f"{swap['failures']:.0f} failed",
            f"swap {swap['swap_s'] * 1000:.0f} ms",
        ),
    ]
    print_table("model service", rows, ("figure", "p50 / value", "p99", "note"))
    return figures
