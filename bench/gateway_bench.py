"""Gateway figures: chat completions through the OpenAI-compatible gateway, over loopback,
with the load generator in its own process.

Servers, each a process of its own, in the same run:

- **bare**: an aiohttp server that reads the request and answers the very bytes the
  gateway answered to it (one captured answer): the floor any Python HTTP service pays;
- **gateway**: `Gateway` over a `ModelServiceImpl` with a zero-latency simulated model,
  so the figures are the gateway's own cost plus the Model Service's routing and the
  simulated model's own work (its policy and token encoding); one worker, then
  `--gateway-workers`-style several processes on one port (SO_REUSEPORT);
- **gateway, canned model**: the same gateway over a Model Service that hands back one
  stored answer: what the gateway itself costs, without the model's work.

Load generators (`python -m bench.gateway_bench load ...`) are processes of their own:
aiohttp clients, C connections each sending its next request when the last is answered,
for a fixed time after a warm-up; requests/s and latency percentiles of the requests
completed in the measured window. Concurrency 64 and 1,024; the servers take turns, three
rounds each, and the median round is reported (the machine may be shared).

Then *many tasks*: 10,000 concurrent simulated agent loops (spread over several load
processes, the fd limit raised), each a task (`X-MegaFlow-Task`) making a few chat calls
with its growing conversation through the one-worker gateway, bounded in time. A 429
(the gateway or the Model Service full) is retried after a pause, as OpenAI clients do,
and counted.

The in-process `ModelServiceImpl.generate` rate (what an embedded agent pays) is given
for reference, as in earlier versions of this benchmark.

    python -m bench.gateway_bench serve bare|gateway ...   # a server (prints its ready line)
    python -m bench.gateway_bench load ...                 # a load generator (prints JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import ms, pct, print_table
from megaflow.core.allocator import preload

SYSTEM = "You are a careful software engineer."
MODULE = "bench.gateway_bench"
TASK_HEADER = "X-MegaFlow-Task"  # = megaflow.model.gateway.TASK_HEADER


def _raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of sockets); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _opening() -> list[dict[str, str]]:
    from megaflow.tasks.swe_synth import generate_tasks

    task = generate_tasks(1, seed=1)[0]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": task.problem_statement},
    ]


# -- servers -------------------------------------------------------------------------------


def bench_model_service() -> Any:
    """The gateway's Model Service here: a zero-latency simulated model (module level, so
    gateway worker processes can build their own)."""
    from megaflow.model.service import ModelServiceImpl
    from megaflow.testing.simulated_model import SimulatedBackend

    return ModelServiceImpl([SimulatedBackend.fast(slots=16_384)])


class CannedModelService:
    """A Model Service that answers every call with one answer the simulated model gave:
    the gateway with (almost) no model work behind it, to tell its own cost apart."""

    def __init__(self) -> None:
        self.service = bench_model_service()
        self.answer: Any = None

    async def start(self) -> None:
        from megaflow.v1 import common_pb2, model_pb2

        messages = [common_pb2.ChatMessage(**m) for m in _opening()]
        request = model_pb2.GenerateRequest(task_id="canned", messages=messages)
        self.answer = await self.service.generate(request)

    async def generate(self, request: Any) -> Any:
        return self.answer

    async def list_models(self, request: Any) -> Any:
        return await self.service.list_models(request)

    async def health(self, request: Any) -> Any:
        return await self.service.health(request)

    async def stop(self) -> None:
        await self.service.stop()


async def _serve_gateway(args: argparse.Namespace) -> None:
    from megaflow.model.gateway import Gateway, GatewayConfig

    config = GatewayConfig(max_in_flight=16_384)
    service = CannedModelService() if args.canned else bench_model_service()
    await service.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if args.workers > 1:
        from megaflow.model.gateway_workers import GatewayWorkers

        gateway = Gateway(service, port=args.port, config=config, reuse_port=True)
        await gateway.start()
        workers = GatewayWorkers(
            functools.partial(bench_model_service), gateway.host, gateway.port, args.workers - 1
        )
        await workers.start()
    else:
        gateway = Gateway(service, port=args.port, config=config)  # works on older gateways
        await gateway.start()
        workers = None
    print(f"megaflow gateway ready on {gateway.host}:{gateway.port}", flush=True)
    try:
        await stop.wait()
    finally:
        if workers is not None:
            await workers.stop()
        await gateway.stop()
        await service.stop()


async def _serve_bare(args: argparse.Namespace) -> None:
    from aiohttp import web

    answer = await asyncio.to_thread(Path(args.answer).read_bytes)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"megaflow bare ready on 127.0.0.1:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# -- load generator --------------------------------------------------------------------------


async def _post(session: Any, url: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, int]:
    """One call; a 429 or a refused connection is retried after a pause. (answer, retries)"""
    import aiohttp

    retries = 0
    while True:
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
                if resp.status == 429:
                    retries += 1
                    await asyncio.sleep(0.05 * min(retries, 20))
                    continue
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
                return data, retries
        except (aiohttp.ClientConnectionError, TimeoutError):
            retries += 1
            if retries > 50:
                raise
            await asyncio.sleep(0.05 * min(retries, 20))


async def _load_rate(args: argparse.Namespace) -> dict[str, Any]:
    """C connections, each sending its next request when the last is answered."""
    import aiohttp

    url = args.url + "/v1/chat/completions"
    body = json.dumps({"model": "simulated", "messages": _opening()}).encode()
    headers = {"Content-Type": "application/json"}
    samples: list[float] = []
    errors = retried = answered = 0  # answered: warm-up included (the server's CPU/request)
    start = time.perf_counter()
    window_start, window_end = start + args.warmup, start + args.warmup + args.duration

    async def connection(session: Any, i: int) -> None:
        nonlocal errors, retried, answered
        while (t0 := time.perf_counter()) < window_end:
            try:
                _, retries = await _post(session, url, body, headers | {TASK_HEADER: f"r-{i}"})
                retried += retries
                answered += 1
            except Exception:
                errors += 1
                continue
            t1 = time.perf_counter()
            if window_start <= t1 <= window_end:  # completed in the window
                samples.append(t1 - t0)

    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(connection(session, i) for i in range(args.concurrency)))
    return {"count": len(samples), "window_s": args.duration, "errors": errors,
            "retried": retried, "answered": answered, "latencies": samples}  # fmt: skip


async def _load_tasks(args: argparse.Namespace) -> dict[str, Any]:
    """`tasks` agent loops at once, each `calls` chat calls with its growing conversation,
    tagged with its task id; all loaders start at `start_at` (wall clock)."""
    import aiohttp

    url = args.url + "/v1/chat/completions"
    opening = _opening()
    samples: list[float] = []
    done = errors = retried = 0

    async def task(session: Any, i: int) -> None:
        nonlocal done, errors, retried
        messages = list(opening)
        headers = {"Content-Type": "application/json", TASK_HEADER: f"{args.prefix}-{i}"}
        try:
            for turn in range(args.calls):
                body = json.dumps({"model": "simulated", "messages": messages}).encode()
                t0 = time.perf_counter()
                data, retries = await _post(session, url, body, headers)
                samples.append(time.perf_counter() - t0)
                retried += retries
                messages.append(json.loads(data)["choices"][0]["message"])
                messages.append({"role": "user", "content": f"observation {turn}: ok"})
            done += 1
        except Exception:
            errors += 1

    connector = aiohttp.TCPConnector(limit=0)  # one connection per task: N sockets
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        t0 = time.perf_counter()
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(task(session, i) for i in range(args.tasks)))
        elapsed = time.perf_counter() - t0
    return {"done": done, "errors": errors, "retried": retried, "elapsed_s": elapsed,
            "latencies": samples}  # fmt: skip


# -- the benchmark -----------------------------------------------------------------------------


def _loader(*args: str) -> subprocess.Popen[str]:
    from megaflow.testing.processes import spawn

    argv = [sys.executable, "-m", MODULE, "load", *args]
    return spawn(argv, stdout=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    from megaflow.testing.processes import stop_group

    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace_s=1.0)
        raise RuntimeError("a load generator ran past its bound") from None
    if proc.returncode != 0:
        raise RuntimeError(f"a load generator failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its live descendants (gateway
    workers), from /proc; 0.0 where /proc cannot tell."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def _rate(
    url: str, concurrency: int, warmup: float, duration: float, server_pid: int | None = None
) -> dict[str, float]:
    """One load run; with `server_pid`, also the server's CPU time per answered request
    (its user + system time over the whole run / every request answered, warm-up
    included): the figure that does not swing with the shared machine's load."""
    cpu0 = _cpu_s(server_pid) if server_pid else 0.0
    proc = _loader(
        "--url", url, "--concurrency", str(concurrency),
        "--warmup", str(warmup), "--duration", str(duration),
    )  # fmt: skip
    r = _collect(proc, warmup + duration + 90)
    cpu = _cpu_s(server_pid) - cpu0 if server_pid else float("nan")
    lat = r["latencies"] or [float("nan")]
    answered = r.get("answered") or r["count"]
    return {
        "cpu_us": cpu / answered * 1e6 if answered else float("nan"),
        "rps": r["count"] / r["window_s"],
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "errors": r["errors"],
        "retried": r["retried"],
    }


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Of several rounds, the one with the median throughput (its latencies with it)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def _median_cpu(runs: list[dict[str, float]]) -> float:
    """The median of the rounds' server CPU per request (microseconds)."""
    return sorted(r["cpu_us"] for r in runs)[len(runs) // 2]


def _many_tasks(url: str, tasks: int, calls: int, loaders: int, bound_s: float) -> dict[str, float]:
    start_at = time.time() + 3.0  # every loader imported and connected before the start
    per = [tasks // loaders + (1 if i < tasks % loaders else 0) for i in range(loaders)]
    procs = []
    for i, n in enumerate(per):
        args = ["--url", url, "--tasks", str(n), "--calls", str(calls), "--prefix", f"t{i}"]
        procs.append(_loader(*args, "--start-at", str(start_at), "--timeout", str(bound_s)))
    results = [_collect(p, bound_s + 60) for p in procs]
    lat = [x for r in results for x in r["latencies"]] or [float("nan")]
    elapsed = max(r["elapsed_s"] for r in results)
    return {
        "tasks": float(tasks),
        "done": float(sum(r["done"] for r in results)),
        "errors": float(sum(r["errors"] for r in results)),
        "retried": float(sum(r["retried"] for r in results)),
        "elapsed_s": elapsed,
        "calls_per_s": len(lat) / elapsed,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
    }


async def _inproc_rate(n: int, concurrency: int) -> float:
    from megaflow.v1 import common_pb2, model_pb2

    service = bench_model_service()
    messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in _opening()]
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await service.generate(model_pb2.GenerateRequest(task_id=f"b-{i}", messages=messages))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = n / (time.perf_counter() - t0)
    await service.stop()
    return rate


async def _streaming(calls: int, concurrency: int, time_scale: float = 1.0) -> dict[str, float]:
    """Time to the first content chunk of a streamed answer against the time to the
    whole answer, plain and streamed, through an in-process gateway over the simulated
    model with its default GPU latency model (decode 4 ms a token, `time_scale`)."""
    import aiohttp

    from megaflow.model.gateway import Gateway
    from megaflow.model.latency import GpuLatencyModel, LatencyConfig
    from megaflow.model.service import ModelServiceImpl
    from megaflow.testing.simulated_model import SimulatedBackend

    latency = GpuLatencyModel(LatencyConfig(time_scale=time_scale))
    service = ModelServiceImpl([SimulatedBackend(latency=latency)])
    first: list[float] = []
    whole_streamed: list[float] = []
    whole_plain: list[float] = []
    chunks: list[int] = []
    counter = iter(range(calls))
    async with Gateway(service) as gateway, aiohttp.ClientSession() as session:
        url = gateway.base_url + "/chat/completions"

        async def worker() -> None:
            for i in counter:
                body = {"model": "simulated", "messages": _opening()}
                headers = {TASK_HEADER: f"s-{i}"}
                t0 = time.perf_counter()
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                whole_plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                seen = 0
                async with session.post(
                    url, json={**body, "stream": True}, headers=headers
                ) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: {") and b'"content":"' in line:
                            if b'"content":""' in line:
                                continue  # the role chunk
                            if not seen:
                                first.append(time.perf_counter() - t0)
                            seen += 1
                whole_streamed.append(time.perf_counter() - t0)
                chunks.append(seen)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await service.stop()
    return {
        "first_chunk_p50": pct(first, 50),
        "streamed_whole_p50": pct(whole_streamed, 50),
        "plain_whole_p50": pct(whole_plain, 50),
        "content_chunks_p50": pct([float(c) for c in chunks], 50),
    }


def _capture_answer(url: str, path: Path) -> None:
    """What the gateway answers to the load's request, for the bare server to send."""
    import urllib.request

    body = json.dumps({"model": "simulated", "messages": _opening()}).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        path.write_bytes(resp.read())


async def run(quick: bool = False) -> dict[str, float]:
    from megaflow.testing.processes import ServiceProcess

    warmup, duration, rounds = (1.0, 3.0, 1) if quick else (1.5, 4.0, 3)
    tasks, calls, loaders = (2_000, 3, 2) if quick else (10_000, 3, 4)
    bound_s = 90.0 if quick else 300.0
    workers = max(2, os.cpu_count() or 1)
    _raise_fd_limit()
    figures: dict[str, float] = {}
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        answer = Path(tmp) / "answer.json"
        procs: dict[str, ServiceProcess] = {}
        try:
            procs["gateway"] = ServiceProcess("gateway", "--workers", "1", module=MODULE).start()
            gateway_url = f"http://{procs['gateway'].address}"
            await asyncio.to_thread(_capture_answer, gateway_url, answer)
            procs["bare"] = ServiceProcess("bare", "--answer", str(answer), module=MODULE).start()
            procs["gateway_canned"] = ServiceProcess(
                "gateway", "--workers", "1", "--canned", module=MODULE
            ).start()
            if importlib.util.find_spec("megaflow.model.gateway_workers") is not None:
                procs["gateway_n"] = ServiceProcess(
                    "gateway", "--workers", str(workers), module=MODULE
                ).start(timeout_s=90)
            # (older gateways, measured for the before/after, have one process only)
            urls = {name: f"http://{p.address}" for name, p in procs.items()}
            labels = {
                "bare": "bare aiohttp, same answer bytes, 1 process (baseline)",
                "gateway_canned": "gateway, 1 worker, canned model (the gateway's own cost)",
                "gateway": "gateway, 1 worker",
                "gateway_n": f"gateway, {workers} workers (SO_REUSEPORT)",
            }
            names = [n for n in ("bare", "gateway_canned", "gateway", "gateway_n") if n in urls]
            for concurrency in (64, 1024):
                # the servers take turns, `rounds` times: a change in the machine's load
                # (it is shared) falls on all of them; each figure is the median round
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
                for _ in range(rounds):
                    for name in names:
                        runs[name].append(
                            await asyncio.to_thread(
                                _rate, urls[name], concurrency, warmup, duration, procs[name].pid
                            )
                        )
                measured = {name: _median_run(r) for name, r in runs.items()}
                cpu = {name: _median_cpu(r) for name, r in runs.items()}
                base = measured["bare"]
                for name, m in measured.items():
                    figures[f"{name}_c{concurrency}_cpu_us"] = cpu[name]
                    rows.append(
                        (
                            f"{labels[name]}, concurrency {concurrency}",
                            f"{m['rps']:,.0f}/s",
                            f"{cpu[name]:,.0f} us",
                            f"{cpu['bare'] / cpu[name]:.2f}x",
                            ms(m["p50"]),
                            ms(m["p99"]),
                            f"{m['rps'] / base['rps']:.2f}x",
                            f"{m['p99'] / base['p99']:.2f}x",
                            f"{m['errors']:.0f} / {m['retried']:.0f}",
                        )
                    )
                    for key in ("rps", "p50", "p99", "errors", "retried"):
                        scale = 1000 if key in ("p50", "p99") else 1
                        suffix = "_ms" if scale == 1000 else ""
                        figures[f"{name}_c{concurrency}_{key}{suffix}"] = m[key] * scale
            print_table(
                "OpenAI gateway against a bare aiohttp server (zero-latency simulated model; "
                "load generator in its own process)",
                rows,
                ("figure", "requests/s", "server CPU/request", "bare CPU / this CPU", "p50",
                 "p99", "throughput vs bare", "p99 vs bare", "errors / retried"),
            )  # fmt: skip
            many = await asyncio.to_thread(
                _many_tasks, urls["gateway"], tasks, calls, loaders, bound_s
            )
            figures.update({f"tasks_{k}": v for k, v in many.items()})
            print_table(
                f"{tasks:,} concurrent tasks through the gateway (1 worker), {calls} chat calls "
                f"each, {loaders} load processes",
                [
                    (
                        f"{many['done']:,.0f} / {tasks:,}",
                        f"{many['elapsed_s']:.1f} s",
                        f"{many['calls_per_s']:,.0f}/s",
                        ms(many["p50"]),
                        ms(many["p99"]),
                        f"{many['errors']:.0f} / {many['retried']:.0f}",
                    )
                ],
                ("tasks done", "wall time", "calls/s", "p50", "p99", "errors / retried"),
            )
        finally:
            for proc in reversed(list(procs.values())):
                proc.stop()
    stream = await _streaming(40 if quick else 200, 8)
    figures.update({f"stream_{k}": v for k, v in stream.items()})
    print_table(
        "Streaming (simulated model, decode 4 ms a token; in-process gateway, concurrency 8)",
        [
            (
                ms(stream["first_chunk_p50"]),
                ms(stream["streamed_whole_p50"]),
                ms(stream["plain_whole_p50"]),
                f"{stream['content_chunks_p50']:.0f}",
            )
        ],
        ("first content chunk p50", "whole streamed answer p50", "plain answer p50",
         "content chunks per answer"),
    )  # fmt: skip
    inproc = await _inproc_rate(2_000 if quick else 10_000, 64)
    figures["inproc_c64_rps"] = inproc
    print(f"reference: in-process ModelServiceImpl.generate, concurrency 64: {inproc:,.0f}/s")
    return figures


# -- entry points ------------------------------------------------------------------------------


def main() -> None:
    preload()  # the allocator MegaFlow's own processes run on (may re-execute this one)
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve").add_subparsers(dest="kind", required=True)
    gateway = serve.add_parser("gateway")
    gateway.add_argument("--port", type=int, default=0)
    gateway.add_argument("--workers", type=int, default=1)
    gateway.add_argument("--canned", action="store_true", help="a canned model (no work)")
    bare = serve.add_parser("bare")
    bare.add_argument("--port", type=int, default=0)
    bare.add_argument("--answer", required=True)
    load = sub.add_parser("load")
    load.add_argument("--url", required=True)
    load.add_argument("--concurrency", type=int, default=64)
    load.add_argument("--warmup", type=float, default=1.0)
    load.add_argument("--duration", type=float, default=5.0)
    load.add_argument("--tasks", type=int, default=0)
    load.add_argument("--calls", type=int, default=3)
    load.add_argument("--prefix", default="t")
    load.add_argument("--start-at", type=float, default=0.0)
    load.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.command == "serve":
        asyncio.run(_serve_gateway(args) if args.kind == "gateway" else _serve_bare(args))
    elif args.command == "load":
        result = asyncio.run(_load_tasks(args) if args.tasks else _load_rate(args))
        print(json.dumps(result), flush=True)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(quick=True))


if __name__ == "__main__":
    main()
