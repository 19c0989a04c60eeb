"""How much of a naive loop's per-command cost is CPU, and how much is waiting.

`python -m bench.baseline.exec_cost [N]` measures, on this machine and in one run:

- `docker exec CONTAINER echo hi` and `docker run --rm --network none IMAGE true`
  (what `bench/docker_bench.py` times at 51.5 and 193 ms p50) against a private dockerd:
  wall time per command, and the CPU time it costs *all* the
  processes involved: the docker CLI (this process's reaped children), dockerd,
  containerd and the container shims (their own and their reaped children's CPU: the
  shim reaps `runc exec`), and the container's cgroup (`runc init` and `echo`);
- SWE-ReX's `LocalRuntime` running `echo hi` in its bash session (what
  `bench/env_bench.py` times at 115.7 ms p50): wall time, and the CPU of this process
  plus its bash session (`RUSAGE_CHILDREN` does not see a live child, so the session's
  CPU is read from `/proc`).

The CPU share = CPU seconds / wall seconds per command; the rest of the wall time is
waiting (polling intervals, sleeps, I/O). `bench/baseline/scenario.py` cites the
figures this printed. Nothing stays running: the daemon is stopped and removed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from megaflow.testing.processes import pids_mentioning

IMAGE = "megaflow-busybox:exec-cost"


def _proc_cpu_s(pid: int, *, children: bool = True) -> float:
    """utime + stime (+ reaped children's) of one process, in seconds; 0 if gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    own = times.user + times.system
    return own + (times.children_user + times.children_system if children else 0.0)


def _cgroup_cpu_s(roots: list[Path]) -> float:
    """CPU seconds charged to the daemon's container cgroups (v1 cpuacct or v2)."""
    total = 0.0
    for root in roots:
        usage = root / "cpuacct.usage"
        if usage.exists():
            total += int(usage.read_text()) / 1e9
        stat = root / "cpu.stat"
        if stat.exists():
            for line in stat.read_text().splitlines():
                if line.startswith("usage_usec "):
                    total += int(line.split()[1]) / 1e6
    return total


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def docker_cli(n: int) -> dict[str, tuple[float, float, float]]:
    """{what: (median wall s, mean wall s, CPU s per command)} of `docker exec CONTAINER
    echo hi` and `docker run --rm --network none IMAGE true`, against one private dockerd."""
    from megaflow.testing.dockerd import Dockerd, build_busybox_image

    cli = shutil.which("docker") or "docker"
    out: dict[str, tuple[float, float, float]] = {}
    with Dockerd() as daemon:
        build_busybox_image(daemon.api(), IMAGE)
        env = daemon.cli_env()
        name = "exec-cost"
        subprocess.run(
            [cli, "run", "-d", "--name", name, "--network", "none", IMAGE, "sleep", "3600"],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        commands = {
            "docker exec echo hi": [cli, "exec", name, "echo", "hi"],
            "docker run --rm true": [cli, "run", "--rm", "--network", "none", IMAGE, "true"],
        }
        for what, argv in commands.items():
            for _ in range(3):  # warm-up
                subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)

            def cpu() -> float:
                pids = list(pids_mentioning(str(daemon.dir)))  # dockerd, containerd, shims
                roots = daemon.cgroup_dirs()
                return sum(map(_proc_cpu_s, pids)) + _children_cpu_s() + _cgroup_cpu_s(roots)

            cpu0 = cpu()
            walls = []
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
                walls.append(time.perf_counter() - t0)
            cpu1 = cpu()
            out[what] = (statistics.median(walls), statistics.fmean(walls), (cpu1 - cpu0) / n)
    return out


async def _swerex(n: int) -> tuple[float, float, float]:
    from swerex.runtime.abstract import (
        BashAction,
        CloseBashSessionRequest,
        CreateBashSessionRequest,
    )
    from swerex.runtime.local import LocalRuntime

    me = os.getpid()
    runtime = LocalRuntime()
    await runtime.create_session(CreateBashSessionRequest())
    try:
        for _ in range(3):  # warm-up
            await runtime.run_in_session(BashAction(command="echo hi", timeout=10))

        def cpu() -> float:
            kids = [p.pid for p in psutil.Process(me).children(recursive=True)]
            return time.process_time() + sum(_proc_cpu_s(p) for p in kids)

        cpu0 = cpu()
        walls = []
        for _ in range(n):
            t0 = time.perf_counter()
            await runtime.run_in_session(BashAction(command="echo hi", timeout=10))
            walls.append(time.perf_counter() - t0)
        cpu1 = cpu()
    finally:
        await runtime.close_session(CloseBashSessionRequest())
        await runtime.close()
    return statistics.median(walls), statistics.fmean(walls), (cpu1 - cpu0) / n


def swerex(n: int) -> tuple[float, float, float]:
    """(median wall s, mean wall s, CPU s per step) of SWE-ReX `LocalRuntime` `echo hi`."""
    return asyncio.run(_swerex(n))


def main(n: int = 30) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before: {load}")
    figures = docker_cli(n)
    figures["SWE-ReX LocalRuntime echo hi"] = swerex(n)
    for what, (p50, mean, cpu) in figures.items():
        print(
            f"{what:>28}: wall p50 {p50 * 1000:6.1f} ms, mean {mean * 1000:6.1f} ms; CPU "
            f"{cpu * 1000:6.1f} ms per command ({cpu / mean:.0%} of the mean wall), n={n}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
