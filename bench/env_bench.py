"""Environment figures: cold sandbox create, and an `echo` step through the service.

Baseline in the same run: a fresh `bash -c` process per command, which is what a
runtime without a persistent shell pays for every step.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stats import ms, print_table, summarise
from megaflow.env.local import LocalSandbox
from megaflow.env.service import EnvServiceConfig, LocalEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.v1 import env_pb2


async def _cold_creates(root: Path, n: int) -> list[float]:
    samples = []
    for i in range(n):
        sandbox = LocalSandbox(f"bench-{i}", root_dir=root)
        t0 = time.perf_counter()
        await sandbox.start()
        samples.append(time.perf_counter() - t0)
        await sandbox.stop()
    return samples


async def _create_rate(root: Path, n: int, parallel: int) -> float:
    sandboxes = [LocalSandbox(f"rate-{i}", root_dir=root) for i in range(n)]
    gate = asyncio.Semaphore(parallel)

    async def start(sb: LocalSandbox) -> None:
        async with gate:
            await sb.start()

    t0 = time.perf_counter()
    await asyncio.gather(*(start(sb) for sb in sandboxes))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*(sb.stop() for sb in sandboxes))
    return n / elapsed


async def _steps(service: object, env_id: str, n: int) -> list[float]:
    samples = []
    request = env_pb2.ExecuteStepRequest(env_id=env_id, command="echo hi", timeout_s=10)
    for _ in range(n):
        t0 = time.perf_counter()
        await service.execute_step(request)  # type: ignore[attr-defined]
        samples.append(time.perf_counter() - t0)
    return samples


def _fresh_process_steps(n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", "echo hi"], capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return samples


async def run(quick: bool = False) -> dict[str, float]:
    n_create, n_steps = (20, 200) if quick else (100, 1000)
    with tempfile.TemporaryDirectory(prefix="megaflow-bench-") as tmp:
        root = Path(tmp)
        create = summarise("create", await _cold_creates(root / "cold", n_create))
        rate = await _create_rate(root / "rate", n_create, parallel=8)
        async with LocalEnvironmentService(EnvServiceConfig(root_dir=root / "svc")) as service:
            env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
            await _steps(service, env_id, 20)  # warm-up
            local = summarise("inproc", await _steps(service, env_id, n_steps))
            async with GrpcServer("127.0.0.1:0", {"env": service}) as server:
                client = EnvironmentServiceClient(server.address)
                await _steps(client, env_id, 20)
                remote = summarise("grpc", await _steps(client, env_id, n_steps))
                await client.close()
        fresh = summarise("fresh", await asyncio.to_thread(_fresh_process_steps, n_steps // 2))
    rows = [
        ("cold sandbox create (isolation + cgroups)", ms(create["p50"]), ms(create["p99"]), ""),
        ("sandbox creates per second (8 in parallel)", f"{rate:.0f}/s", "", ""),
        (
            "ExecuteStep `echo`, in-process",
            ms(local["p50"]),
            ms(local["p99"]),
            f"{fresh['p50'] / local['p50']:.1f}x faster",
        ),
        (
            "ExecuteStep `echo`, gRPC loopback",
            ms(remote["p50"]),
            ms(remote["p99"]),
            f"{fresh['p50'] / remote['p50']:.1f}x faster",
        ),
        ("baseline: fresh `bash -c` per command", ms(fresh["p50"]), ms(fresh["p99"]), "1.0x"),
    ]
    print_table("environments", rows, ("figure", "p50", "p99", "vs baseline"))
    return {
        "create_p50_ms": create["p50"] * 1000,
        "create_p99_ms": create["p99"] * 1000,
        "creates_per_s": rate,
        "step_inproc_p50_ms": local["p50"] * 1000,
        "step_grpc_p50_ms": remote["p50"] * 1000,
        "step_fresh_process_p50_ms": fresh["p50"] * 1000,
    }
