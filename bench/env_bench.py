"""Environment figures: sandbox create (cold, and warm claims through the service),
pool reset, live sandboxes and their memory, and an `echo` step through the service.

Baselines in the same run: a fresh `bash -c` process per command (what a runtime
without a persistent shell pays per step), and SWE-ReX's local runtime (a bash
session driven through pexpect), when `swe-rex` is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.stats import ms, print_table, summarise
from megaflow.env import backends
from megaflow.env.local import LocalSandbox
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.v1 import common_pb2, env_pb2

PERSISTENT = common_pb2.EnvPlacement(mode="persistent")


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


async def _service_creates(
    root: Path, n: int, *, warm: bool, persistent: bool = False, grpc: bool = False
) -> list[float]:
    """CreateEnvironment latency through the service API (in-process, or gRPC loopback):
    cold (no pool), or warm claims (each finds a ready sandbox: the pool was refilled or
    the released sandbox reset meanwhile)."""
    config = EnvServiceConfig(root_dir=root, warm_pool={"host": 4} if warm else {})
    request = env_pb2.CreateEnvironmentRequest()
    if persistent:
        request.placement.CopyFrom(PERSISTENT)
    samples = []
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(SandboxEnvironmentService(config))
        api: Any = service
        if grpc:
            server = await stack.enter_async_context(GrpcServer("127.0.0.1:0", {"env": service}))
            api = EnvironmentServiceClient(server.address)
            stack.push_async_callback(api.close)
        for _ in range(n):
            await _settled(service)
            t0 = time.perf_counter()
            env_id = (await api.create_environment(request)).env_id
            samples.append(time.perf_counter() - t0)
            await api.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    return samples


async def _settled(service: SandboxEnvironmentService) -> None:
    while True:
        await service.warmed()
        if service.pool.starting == 0:
            return
        await asyncio.sleep(0.001)


async def _resets(root: Path, n: int) -> tuple[list[float], list[float]]:
    """Reset of a used sandbox: wipe /workspace + new shell, vs new shell + restore of a
    pristine (empty) snapshot."""
    wipe, restore = [], []
    async with LocalSandbox("bench-reset", root_dir=root) as sandbox:
        pristine = await sandbox.snapshot()
        for i in range(2 * n):
            await sandbox.execute("mkdir -p a/b && seq 1000 > a/b/f && touch c d e", 10)
            t0 = time.perf_counter()
            if i % 2:
                await backends.reset(sandbox, 10)
                wipe.append(time.perf_counter() - t0)
            else:
                await backends.reset(sandbox, 10, pristine)
                restore.append(time.perf_counter() - t0)
    return wipe, restore


def _sandbox_memory(root: Path) -> tuple[int, int]:
    """(RSS summed over the sandboxes' processes, memory charged to their cgroups) in bytes."""
    rss = charged = 0
    for folder in root.iterdir():
        try:
            owner = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        pids: set[int] = set()
        for cgroup in map(Path, owner.get("cgroups", [])):
            for name in ("memory.usage_in_bytes", "memory.current"):
                if (cgroup / name).exists():
                    charged += int((cgroup / name).read_text())
            if (cgroup / "cgroup.procs").exists():
                pids.update(map(int, (cgroup / "cgroup.procs").read_text().split()))
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                rss += _rss(pid)
    return rss, charged


def _rss(pid: int | None = None) -> int:
    """Resident memory of ``pid`` (default: this process), bytes."""
    return int(psutil.Process(pid).memory_info().rss)


async def _ramp(root: Path, target: int) -> dict[str, float]:
    """Create `target` live environments through the service (50 at a time)."""
    config = EnvServiceConfig(root_dir=root, max_environments=target, memory_mib=64, pids=32)
    rss_before = _rss()
    async with SandboxEnvironmentService(config) as service:
        t0 = time.perf_counter()
        live: list[str] = []
        try:
            while len(live) < target:
                batch = min(50, target - len(live))
                replies = await asyncio.gather(
                    *(
                        service.create_environment(env_pb2.CreateEnvironmentRequest())
                        for _ in range(batch)
                    )
                )
                live += [r.env_id for r in replies]
        except Exception as exc:  # the machine's limit, before the target
            print(f"ramp stopped at {len(live)} live sandboxes: {exc}")
        elapsed = time.perf_counter() - t0
        rss, charged = await asyncio.to_thread(_sandbox_memory, root)
        service_rss = _rss() - rss_before
        count = max(len(live), 1)
    return {
        "live": float(len(live)),
        "ramp_s": elapsed,
        "rss_mib_per_sandbox": rss / count / 2**20,
        "cgroup_mib_per_sandbox": charged / count / 2**20,
        "service_kib_per_sandbox": service_rss / count / 1024,
    }


async def _swerex_steps(n: int) -> list[float] | None:
    """`echo hi` in a SWE-ReX LocalRuntime bash session; None if swe-rex is missing."""
    try:
        from swerex.runtime.abstract import (
            BashAction,
            CloseBashSessionRequest,
            CreateBashSessionRequest,
        )
        from swerex.runtime.local import LocalRuntime
    except ImportError:
        return None
    runtime = LocalRuntime()
    await runtime.create_session(CreateBashSessionRequest())
    samples = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await runtime.run_in_session(BashAction(command="echo hi", timeout=10))
            samples.append(time.perf_counter() - t0)
    finally:
        await runtime.close_session(CloseBashSessionRequest())
        await runtime.close()
    return samples


async def run(quick: bool = False) -> dict[str, float]:
    n_create, n_steps = (20, 200) if quick else (100, 1000)
    n_claims, ramp_to, n_swerex = (100, 200, 20) if quick else (1000, 2000, 100)
    with tempfile.TemporaryDirectory(prefix="megaflow-bench-") as tmp:
        root = Path(tmp)
        create = summarise("create", await _cold_creates(root / "cold", n_create))
        rate = await _create_rate(root / "rate", n_create, parallel=8)
        svc_cold = summarise("svc-cold", await _service_creates(root / "sc", n_create, warm=False))
        warm = summarise("warm", await _service_creates(root / "sw", n_claims, warm=True))
        warm_grpc = summarise(
            "warm-grpc", await _service_creates(root / "sg", n_claims, warm=True, grpc=True)
        )
        reused = summarise(
            "reused", await _service_creates(root / "sp", n_claims, warm=False, persistent=True)
        )
        wipe_s, restore_s = await _resets(root / "reset", n_create)
        wipe, restore = summarise("wipe", wipe_s), summarise("restore", restore_s)
        async with SandboxEnvironmentService(EnvServiceConfig(root_dir=root / "svc")) as service:
            env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
            await _steps(service, env_id, 20)  # warm-up
            local = summarise("inproc", await _steps(service, env_id, n_steps))
            async with GrpcServer("127.0.0.1:0", {"env": service}) as server:
                client = EnvironmentServiceClient(server.address)
                await _steps(client, env_id, 20)
                remote = summarise("grpc", await _steps(client, env_id, n_steps))
                await client.close()
            swerex_samples = await _swerex_steps(n_swerex)
            ours = summarise("ours", await _steps(service, env_id, n_steps))  # same run, again
        fresh = summarise("fresh", await asyncio.to_thread(_fresh_process_steps, n_steps // 2))
        ramp = await _ramp(root / "ramp", ramp_to)
    rows = [
        ("cold sandbox create (isolation + cgroups)", ms(create["p50"]), ms(create["p99"]), ""),
        ("sandbox creates per second (8 in parallel)", f"{rate:.0f}/s", "", ""),
        (
            "CreateEnvironment, cold (service, in-process)",
            ms(svc_cold["p50"]),
            ms(svc_cold["p99"]),
            "",
        ),
        (
            "CreateEnvironment, warm pool claim",
            ms(warm["p50"]),
            ms(warm["p99"]),
            "target 2 / 20 ms",
        ),
        ("CreateEnvironment, warm claim over gRPC", ms(warm_grpc["p50"]), ms(warm_grpc["p99"]), ""),
        ("CreateEnvironment, persistent (reset, reused)", ms(reused["p50"]), ms(reused["p99"]), ""),
        ("pool reset: wipe /workspace + new shell", ms(wipe["p50"]), ms(wipe["p99"]), ""),
        ("pool reset: new shell + restore pristine", ms(restore["p50"]), ms(restore["p99"]), ""),
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
    figures = {
        "create_p50_ms": create["p50"] * 1000,
        "create_p99_ms": create["p99"] * 1000,
        "creates_per_s": rate,
        "step_inproc_p50_ms": local["p50"] * 1000,
        "step_grpc_p50_ms": remote["p50"] * 1000,
        "step_fresh_process_p50_ms": fresh["p50"] * 1000,
        "service_cold_create_p50_ms": svc_cold["p50"] * 1000,
        "service_cold_create_p99_ms": svc_cold["p99"] * 1000,
        "warm_claim_p50_ms": warm["p50"] * 1000,
        "warm_claim_p99_ms": warm["p99"] * 1000,
        "warm_claim_grpc_p50_ms": warm_grpc["p50"] * 1000,
        "warm_claim_grpc_p99_ms": warm_grpc["p99"] * 1000,
        "persistent_claim_p50_ms": reused["p50"] * 1000,
        "reset_wipe_p50_ms": wipe["p50"] * 1000,
        "reset_restore_p50_ms": restore["p50"] * 1000,
        "live_sandboxes": ramp["live"],
        "live_ramp_s": ramp["ramp_s"],
        "rss_mib_per_sandbox": ramp["rss_mib_per_sandbox"],
        "cgroup_mib_per_sandbox": ramp["cgroup_mib_per_sandbox"],
        "service_kib_per_sandbox": ramp["service_kib_per_sandbox"],
    }
    if swerex_samples is not None:
        swerex = summarise("swerex", swerex_samples)
        ratio = swerex["p50"] / ours["p50"]
        rows.append(
            ("SWE-ReX local runtime `echo` (same run)", ms(swerex["p50"]), ms(swerex["p99"]), "")
        )
        rows.append(
            (
                "ExecuteStep `echo` vs SWE-ReX (same run)",
                ms(ours["p50"]),
                ms(ours["p99"]),
                f"{ratio:.0f}x faster (target 20x)",
            )
        )
        figures |= {
            "swerex_step_p50_ms": swerex["p50"] * 1000,
            "step_vs_swerex_p50_ms": ours["p50"] * 1000,
            "swerex_ratio": ratio,
        }
    else:
        rows.append(("SWE-ReX local runtime", "not installed", "", "pip install swe-rex"))
    rows.append(
        (
            f"live sandboxes (ramp to {ramp_to}, 50 at a time)",
            f"{ramp['live']:.0f} in {ramp['ramp_s']:.1f} s",
            "",
            f"{ramp['rss_mib_per_sandbox']:.2f} MiB RSS, {ramp['cgroup_mib_per_sandbox']:.2f} MiB "
            f"cgroup, {ramp['service_kib_per_sandbox']:.0f} KiB service, each",
        )
    )
    print_table("environments", rows, ("figure", "p50", "p99", "vs baseline"))
    return figures
