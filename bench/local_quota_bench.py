"""Cost of the local backend's default disk quotas (issue 17), same run, same machine.

Every local sandbox now mounts two tmpfs (its folder, the workspace quota, and its
/tmp), each with a size and an inode limit, and unmounts them at stop. Measured here:

- ``create``: a whole cold create (``LocalSandbox.start``) and its stop, as they are;
- ``quota``: just the quota's own work per sandbox, mount + unmount of both tmpfs,
  on the same machine in the same run: what a create would cost less without it.

Run: ``python -m bench local-quota [--quick]``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.stats import ms, summarise
from megaflow.env.local import LocalSandbox
from megaflow.env.local.quota import mount_quota, unmount_sandbox


async def _creates(root: Path, n: int) -> tuple[list[float], list[float]]:
    starts, stops = [], []
    for i in range(n):
        sandbox = LocalSandbox(f"q-{i}", root_dir=root)
        t0 = time.perf_counter()
        await sandbox.start()
        starts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await sandbox.stop()
        stops.append(time.perf_counter() - t0)
    return starts, stops


def _quota_only(root: Path, n: int) -> list[float]:
    samples = []
    for i in range(n):
        folder = root / f"m-{i}"
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        mount_quota(folder, 512, mode=0o711)
        (folder / "tmp").mkdir()
        mount_quota(folder / "tmp", 256, mode=0o700, uid=61000, gid=61000)
        unmount_sandbox(folder)
        samples.append(time.perf_counter() - t0)
        folder.rmdir()
    return samples


async def run(quick: bool = False) -> dict[str, float]:
    n = 20 if quick else 100
    with tempfile.TemporaryDirectory(prefix="megaflow-bench-quota-") as tmp:
        root = Path(tmp)
        starts, stops = await _creates(root / "sb", n)
        quota = _quota_only(root / "mounts", n)
    create, stop, only = (
        summarise("create", starts),
        summarise("stop", stops),
        summarise("q", quota),
    )
    print(
        f"local sandbox create (with default quotas), n={n}: p50 {ms(create['p50'])}, "
        f"p99 {ms(create['p99'])}; stop p50 {ms(stop['p50'])}"
    )
    print(
        f"quota mechanism alone (2 tmpfs mount+umount): p50 {ms(only['p50'])}, "
        f"p99 {ms(only['p99'])} = {100 * only['p50'] / (create['p50'] + stop['p50']):.1f}% "
        "of create+stop"
    )
    return {
        "create_p50_ms": create["p50"] * 1000,
        "create_p99_ms": create["p99"] * 1000,
        "stop_p50_ms": stop["p50"] * 1000,
        "quota_p50_ms": only["p50"] * 1000,
        "quota_p99_ms": only["p99"] * 1000,
    }
