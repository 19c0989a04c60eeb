"""Docker sandbox figures: cold create, create rate, `echo` steps; runc and gVisor.

Starts its own private dockerd (and stops it), builds a busybox image offline, then
measures `DockerSandbox` against baselines in the same run: a plain
`docker run --rm --network none IMAGE true` and a `docker exec CONTAINER echo hi`
(what a runtime without a persistent shell pays per step), both through the docker
CLI against the same daemon.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

from bench.stats import ms, print_table, summarise
from megaflow.env.docker import DockerEngine, DockerSandbox
from megaflow.testing.dockerd import Dockerd, build_busybox_image

IMAGE = "megaflow-busybox:bench"


async def _cold_creates(engine: DockerEngine, n: int, runtime: str) -> tuple[list[float], float]:
    """Sequential create+start+shell; returns the samples and the mean stop time."""
    samples, stops = [], []
    for i in range(n):
        sandbox = DockerSandbox(f"bench-{runtime}-{i}", engine=engine, image=IMAGE, runtime=runtime)
        t0 = time.perf_counter()
        await sandbox.start()
        samples.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        await sandbox.stop()
        stops.append(time.perf_counter() - t1)
    return samples, sum(stops) / len(stops)


async def _create_rate(engine: DockerEngine, n: int, parallel: int, prefix: str = "rate") -> float:
    sandboxes = [DockerSandbox(f"{prefix}-{i}", engine=engine, image=IMAGE) for i in range(n)]
    gate = asyncio.Semaphore(parallel)

    async def start(sb: DockerSandbox) -> None:
        async with gate:
            await sb.start()

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(start(sb) for sb in sandboxes))
        return n / (time.perf_counter() - t0)
    finally:
        await asyncio.gather(*(sb.stop() for sb in sandboxes), return_exceptions=True)


async def _create_rate_default_pool_busy(engine: DockerEngine, n: int, parallel: int) -> float:
    """`_create_rate` while every thread of asyncio's default pool is kept busy with
    0.5 s blocking jobs (a stand-in for image extraction): the engine's own pool
    keeps Docker calls from queueing behind them."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def hog() -> None:
        while not stop.is_set():
            await loop.run_in_executor(None, time.sleep, 0.5)

    hogs = [asyncio.create_task(hog()) for _ in range(32)]
    try:
        return await _create_rate(engine, n, parallel, prefix="busy")
    finally:
        stop.set()
        await asyncio.gather(*hogs)


async def _steps(engine: DockerEngine, n: int, runtime: str) -> list[float]:
    async with DockerSandbox(f"steps-{runtime}", engine=engine, image=IMAGE, runtime=runtime) as sb:
        for _ in range(20):
            await sb.execute("echo hi", 10)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await sb.execute("echo hi", 10)
            samples.append(time.perf_counter() - t0)
        return samples


def _cli_samples(daemon: Dockerd, argv: list[str], n: int) -> list[float]:
    env = daemon.cli_env()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
        samples.append(time.perf_counter() - t0)
    return samples


async def _exec_baseline(daemon: Dockerd, engine: DockerEngine, n: int) -> list[float]:
    cli = shutil.which("docker") or "docker"
    async with DockerSandbox("exec-baseline", engine=engine, image=IMAGE) as sb:
        argv = [cli, "exec", sb.container_name, "echo", "hi"]
        return await asyncio.to_thread(_cli_samples, daemon, argv, n)


async def run(quick: bool = False) -> dict[str, float]:
    n_create, n_steps, n_cli, n_gvisor = (10, 200, 10, 3) if quick else (50, 1000, 30, 10)
    cli = shutil.which("docker") or "docker"
    daemon = await asyncio.to_thread(Dockerd().start)
    engine = daemon.engine()
    try:
        t0 = time.perf_counter()
        await asyncio.to_thread(build_busybox_image, daemon.api(), IMAGE)
        image_s = time.perf_counter() - t0
        samples, stop_s = await _cold_creates(engine, n_create, "runc")
        create = summarise("create", samples)
        rate = await _create_rate(engine, n_create, parallel=8)
        busy_rate = await _create_rate_default_pool_busy(engine, n_create, parallel=8)
        step = summarise("step", await _steps(engine, n_steps, "runc"))
        run_argv = [cli, "run", "--rm", "--network", "none", IMAGE, "true"]
        docker_run = summarise(
            "run", await asyncio.to_thread(_cli_samples, daemon, run_argv, n_cli)
        )
        docker_exec = summarise("exec", await _exec_baseline(daemon, engine, n_cli))
        figures = {
            "dockerd_start_s": daemon.start_s,
            "image_build_s": image_s,
            "create_p50_s": create["p50"],
            "create_p99_s": create["p99"],
            "creates_per_s": rate,
            "creates_per_s_default_pool_busy": busy_rate,
            "stop_mean_s": stop_s,
            "echo_p50_s": step["p50"],
            "echo_p99_s": step["p99"],
            "docker_run_p50_s": docker_run["p50"],
            "docker_exec_echo_p50_s": docker_exec["p50"],
        }
        if daemon.runsc:
            samples, _ = await _cold_creates(engine, n_gvisor, "runsc")
            figures["runsc_create_p50_s"] = summarise("g", samples)["p50"]
            gsteps = summarise("g", await _steps(engine, n_steps // 5, "runsc"))
            figures["runsc_echo_p50_s"] = gsteps["p50"]
    finally:
        engine.close()
        await asyncio.to_thread(daemon.stop)
    _print(figures, create, step, docker_run, docker_exec)
    return figures


def _print(
    figures: dict[str, float],
    create: dict[str, float],
    step: dict[str, float],
    docker_run: dict[str, float],
    docker_exec: dict[str, float],
) -> None:
    rows = [
        ("private dockerd start (until /_ping)", ms(figures["dockerd_start_s"]), "", ""),
        ("busybox image build (docker import)", ms(figures["image_build_s"]), "", ""),
        ("DockerSandbox cold create (runc)", ms(create["p50"]), ms(create["p99"]), ""),
        ("  creates/s (8 in parallel)", f"{figures['creates_per_s']:.1f}/s", "", ""),
        (
            "  creates/s, default pool busy",
            f"{figures['creates_per_s_default_pool_busy']:.1f}/s",
            "",
            "asyncio's pool held by 0.5 s jobs",
        ),
        ("  stop (mean)", ms(figures["stop_mean_s"]), "", ""),
        ("baseline: docker run --rm --network none true", ms(docker_run["p50"]), "", ""),
        ("DockerSandbox execute('echo hi') (runc)", ms(step["p50"]), ms(step["p99"]), ""),
        (
            "baseline: docker exec CONTAINER echo hi",
            ms(docker_exec["p50"]),
            ms(docker_exec["p99"]),
            f"{docker_exec['p50'] / step['p50']:.0f}x slower",
        ),
    ]
    if "runsc_create_p50_s" in figures:
        rows += [
            ("DockerSandbox cold create (gVisor runsc)", ms(figures["runsc_create_p50_s"]), "", ""),
            ("DockerSandbox execute('echo hi') (gVisor)", ms(figures["runsc_echo_p50_s"]), "", ""),
        ]
    print_table("Docker sandboxes", rows, ("measure", "p50", "p99", "note"))
