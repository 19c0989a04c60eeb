"""What Docker hardening costs: create and step latency of the hardened profile (capabilities
dropped, MegaFlow's seccomp allowlist, non-root, /workspace and /tmp quota tmpfs mounts)
against Docker's default profile, runc and gVisor, in the same run, interleaved (one of
each in turn, so load drifts hit both); and the per-sandbox cost of the disk-quota
mechanism: the tmpfs mounts (the difference above) against the alternative, a
loop-mounted ext4 file per sandbox (sparse file + mkfs.ext4 + mount + umount + remove,
measured on the host alone, without even a container).

Starts its own private dockerd (and stops it) and a busybox image.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stats import ms, print_table, summarise
from megaflow.env.docker import DockerEngine, DockerSandbox
from megaflow.testing.dockerd import Dockerd, build_busybox_image

IMAGE = "megaflow-busybox:hardening-bench"
PROFILES = ("docker-default", "hardened")


async def _create(engine: DockerEngine, name: str, runtime: str, profile: str) -> float:
    sandbox = DockerSandbox(name, engine=engine, image=IMAGE, runtime=runtime, profile=profile)
    t0 = time.perf_counter()
    await sandbox.start()
    took = time.perf_counter() - t0
    await sandbox.stop()
    return took


async def _creates(engine: DockerEngine, n: int, runtime: str) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {p: [] for p in PROFILES}
    for i in range(n):
        for profile in PROFILES if i % 2 else PROFILES[::-1]:
            samples[profile].append(await _create(engine, f"hb-{runtime}-{i}", runtime, profile))
    return samples


async def _steps(engine: DockerEngine, n: int, runtime: str) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {p: [] for p in PROFILES}
    boxes = {
        p: DockerSandbox(
            f"hs-{runtime}-{p}", engine=engine, image=IMAGE, runtime=runtime, profile=p
        )
        for p in PROFILES
    }
    try:
        for sb in boxes.values():
            await sb.start()
            for _ in range(10):
                await sb.execute("echo hi", 10)
        for _ in range(n):
            for profile, sb in boxes.items():
                t0 = time.perf_counter()
                await sb.execute("echo hi > /tmp/x && cat /tmp/x", 10)
                samples[profile].append(time.perf_counter() - t0)
    finally:
        await asyncio.gather(*(sb.stop() for sb in boxes.values()), return_exceptions=True)
    return samples


def _loop_ext4(n: int, size_mib: int = 1024) -> list[float] | None:
    """Per-sandbox cost of a loop-mounted ext4 quota (None: no loop devices/mkfs here)."""
    if (
        shutil.which("mkfs.ext4") is None
        or os.geteuid() != 0
        or not Path("/dev/loop-control").exists()
    ):
        return None
    samples = []
    with tempfile.TemporaryDirectory(prefix="mf-loop-bench-") as tmp:
        image, mnt = Path(tmp, "disk.img"), Path(tmp, "mnt")
        mnt.mkdir()
        for _ in range(n):
            t0 = time.perf_counter()
            with image.open("wb") as f:
                f.truncate(size_mib * 1024 * 1024)
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-N", "65536", str(image)], check=True, timeout=60
            )
            subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, timeout=60)
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)
            image.unlink()
            samples.append(time.perf_counter() - t0)
    return samples


async def run(quick: bool = False) -> dict[str, float]:
    n_create, n_steps, n_gvisor, n_loop = (6, 100, 3, 5) if quick else (30, 500, 10, 20)
    load_before = os.getloadavg()
    daemon = await asyncio.to_thread(Dockerd().start)
    engine = daemon.engine()
    figures: dict[str, float] = {}
    try:
        await asyncio.to_thread(build_busybox_image, daemon.api(), IMAGE)
        runtimes = [("runc", n_create)] + ([("runsc", n_gvisor)] if daemon.runsc else [])
        for runtime, n in runtimes:
            creates = await _creates(engine, n, runtime)
            steps = await _steps(engine, n_steps if runtime == "runc" else n_steps // 5, runtime)
            for profile in PROFILES:
                c, s = summarise("c", creates[profile]), summarise("s", steps[profile])
                figures[f"{runtime}_{profile}_create_p50_s"] = c["p50"]
                figures[f"{runtime}_{profile}_step_p50_s"] = s["p50"]
                figures[f"{runtime}_{profile}_step_p99_s"] = s["p99"]
        loop = await asyncio.to_thread(_loop_ext4, n_loop)
        if loop is not None:
            figures["loop_ext4_prepare_p50_s"] = summarise("l", loop)["p50"]
    finally:
        engine.close()
        await asyncio.to_thread(daemon.stop)
    figures["load_before"], figures["load_after"] = load_before[0], os.getloadavg()[0]
    _print(figures)
    return figures


def _print(f: dict[str, float]) -> None:
    rows: list[tuple[str, ...]] = []
    for runtime, label in (("runc", "runc"), ("runsc", "gVisor")):
        if f"{runtime}_hardened_create_p50_s" not in f:
            continue
        base_c, hard_c = (
            f[f"{runtime}_docker-default_create_p50_s"],
            f[f"{runtime}_hardened_create_p50_s"],
        )
        base_s, hard_s = (
            f[f"{runtime}_docker-default_step_p50_s"],
            f[f"{runtime}_hardened_step_p50_s"],
        )
        rows += [
            (f"create, Docker default profile ({label})", ms(base_c), ""),
            (f"create, hardened + tmpfs quotas ({label})", ms(hard_c), f"{hard_c - base_c:+.3f} s"),
            (f"step, Docker default profile ({label})", ms(base_s), ""),
            (f"step, hardened ({label})", ms(hard_s), f"{(hard_s / base_s - 1) * 100:+.0f}%"),
        ]
    if "loop_ext4_prepare_p50_s" in f:
        rows.append(
            ("alternative quota: loop ext4 1 GiB (host only)", ms(f["loop_ext4_prepare_p50_s"]), "")
        )
    rows.append(
        (
            "load average (1 min) before / after",
            f"{f['load_before']:.1f} / {f['load_after']:.1f}",
            "",
        )
    )
    print_table("Docker hardening cost", rows, ("measure", "p50", "vs default"))
