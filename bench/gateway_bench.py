"""Gateway figures: chat completions through the OpenAI-compatible gateway over loopback.

A zero-latency simulated model behind `ModelServiceImpl`, so the figures measure the
gateway's own cost: HTTP (aiohttp client and server), JSON <-> protobuf, per-task
recording. Baseline in the same run: `ModelServiceImpl.generate` called in-process,
which is what an embedded agent pays. Concurrency 1 and 64, aiohttp clients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from bench.stats import ms, print_table, summarise
from megaflow.model.gateway import TASK_HEADER, Gateway
from megaflow.model.service import ModelServiceImpl
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, model_pb2

SYSTEM = "You are a careful software engineer."


async def _drive(
    call: Callable[[int], Awaitable[None]], n: int, concurrency: int
) -> tuple[float, list[float]]:
    """Run `n` calls with `concurrency` workers; requests/s and per-call latencies."""
    samples: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0), samples


async def run(quick: bool = False) -> dict[str, float]:
    n1, n64 = (300, 2000) if quick else (1500, 10000)
    task = generate_tasks(1, seed=1)[0]
    messages = [
        common_pb2.ChatMessage(role="system", content=SYSTEM),
        common_pb2.ChatMessage(role="user", content=task.problem_statement),
    ]
    body = {
        "model": "simulated",
        "messages": [{"role": m.role, "content": m.content} for m in messages],
    }
    service = ModelServiceImpl([SimulatedBackend.fast(slots=1024)])
    results: dict[str, tuple[float, dict[str, float]]] = {}

    async def inproc(i: int) -> None:
        request = model_pb2.GenerateRequest(task_id=f"b-{i}", messages=messages)
        await service.generate(request)

    async with Gateway(service) as gateway:
        connector = aiohttp.TCPConnector(limit=128)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = gateway.base_url + "/chat/completions"

            async def http(i: int) -> None:
                headers = {TASK_HEADER: f"g-{i}"}
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"gateway answered HTTP {resp.status}")

            for name, call in (("inproc", inproc), ("gateway", http)):
                for concurrency, n in ((1, n1), (64, n64)):
                    await _drive(call, min(n, 100), concurrency)  # warm-up
                    rate, samples = await _drive(call, n, concurrency)
                    results[f"{name}_c{concurrency}"] = (rate, summarise(name, samples))
    await service.stop()

    rows = []
    for concurrency in (1, 64):
        base = results[f"inproc_c{concurrency}"][0]
        for name, label in (("inproc", "baseline: in-process generate"), ("gateway", "gateway")):
            rate, s = results[f"{name}_c{concurrency}"]
            rows.append(
                (
                    f"{label}, concurrency {concurrency}",
                    f"{rate:.0f}/s",
                    ms(s["p50"]),
                    ms(s["p99"]),
                    f"{rate / base:.2f}x",
                )
            )
    print_table(
        "OpenAI gateway (zero-latency simulated model)",
        rows,
        ("figure", "requests/s", "p50", "p99", "vs baseline"),
    )
    out: dict[str, float] = {}
    for key, (rate, s) in results.items():
        out[f"{key}_rps"] = rate
        out[f"{key}_p50_ms"] = s["p50"] * 1000
        out[f"{key}_p99_ms"] = s["p99"] * 1000
    return out


if __name__ == "__main__":
    asyncio.run(run(quick=True))
