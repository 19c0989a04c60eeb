"""No frozen sandbox outlives its Environment Service.

Frozen processes cannot die (on cgroup v1 not even of SIGKILL, bwrap's
``--die-with-parent`` included): a sandbox left frozen by a service that ends stays,
its bwrap reparented to init, until someone thaws it. The pool freezes the first
sandbox of each spec while it takes its pristine snapshot; a create cancelled then
(its agent gone, its deadline passed, the service stopping) must not leave that
sandbox behind, frozen or not, and a sandbox a crashed service left suspended is
reclaimed (thawed, killed, removed) by the next service on its folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from megaflow.env import backends
from megaflow.env.local import LocalSandbox, features
from megaflow.env.local.cgroups import cgroup_pids, remove_cgroup_dirs
from megaflow.env.local.freezer import freeze_settled, frozen_now
from megaflow.env.local.owner import kill_cgroup_members
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.v1 import env_pb2

pytestmark = pytest.mark.integration


def _config(root: Path) -> EnvServiceConfig:
    return EnvServiceConfig(root_dir=root, artifact_dir=root.parent / "art", reap_interval_s=0.1)


def _owned_cgroups(root: Path) -> dict[str, list[Path]]:
    """Sandbox folder name -> the cgroup folders its owner file names."""
    found = {}
    for folder in root.iterdir() if root.is_dir() else ():
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads((folder / "owner.json").read_text())
            found[folder.name] = [Path(p) for p in record["cgroups"]]
    return found


def _leftovers(root: Path, cgroups: dict[str, list[Path]]) -> list[str]:
    left = [f"folder {p.name}" for p in root.iterdir()] if root.is_dir() else []
    dirs = [d for dirs in cgroups.values() for d in dirs]
    left += [f"cgroup {d}" for d in dirs if d.exists()]
    if frozen_now(d for d in dirs if d.exists()):
        left.append("a frozen cgroup")
    left += [f"process {pid}" for pid in sorted(cgroup_pids(dirs))]
    return left


@pytest.fixture
def sweep(tmp_path: Path) -> Iterator[dict[str, list[Path]]]:
    """Cgroups seen during the test (name -> folders); whatever is left of them at the
    end is thawed, killed and removed, so that a failing test leaks nothing."""
    seen: dict[str, list[Path]] = {}
    yield seen
    dirs = tuple(d for found in seen.values() for d in found)
    kill_cgroup_members(dirs)
    with contextlib.suppress(Exception):
        remove_cgroup_dirs(dirs, timeout_s=2.0)
    shutil.rmtree(tmp_path / "sb", ignore_errors=True)


def _hold(monkeypatch: pytest.MonkeyPatch, phase: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the pristine snapshot of a new sandbox in ``phase`` ("freezing": the freeze
    never settles; "packing": the workspace is being archived, the sandbox frozen, until
    the second event is set). The first event is set once it is there."""
    there, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    if phase == "freezing":

        def settled(control: Path, frozen: bool) -> bool:
            if frozen:
                there.set()
                return False
            return freeze_settled(control, frozen)

        monkeypatch.setattr(features, "freeze_settled", settled)
    else:
        pack: Callable[[Path], bytes] = features.workspace.pack

        def held_pack(folder: Path) -> bytes:
            loop.call_soon_threadsafe(there.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
            return pack(folder)

        monkeypatch.setattr(features.workspace, "pack", held_pack)
    return there, release


@pytest.mark.parametrize("phase", ["freezing", "packing"])
async def test_a_create_cancelled_during_the_pristine_snapshot_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sweep: dict[str, list[Path]],
    phase: str,
) -> None:
    root = tmp_path / "sb"
    service = SandboxEnvironmentService(_config(root))
    await service.start()
    try:
        there, release = _hold(monkeypatch, phase)
        create = asyncio.create_task(
            service.create_environment(env_pb2.CreateEnvironmentRequest(owner="gone"))
        )
        await asyncio.wait_for(there.wait(), 60)
        sweep.update(_owned_cgroups(root))
        assert len(sweep) == 1 and frozen_now(next(iter(sweep.values())))
        create.cancel()  # e.g. its agent died: gRPC cancels the handler
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await create
    finally:
        monkeypatch.undo()
        await service.stop()
    assert _leftovers(root, sweep) == []


async def test_a_snapshot_cancelled_while_it_freezes_thaws_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = LocalSandbox("snap", root_dir=tmp_path / "sb")
    await sandbox.start()
    try:
        there, _ = _hold(monkeypatch, "freezing")
        snapshot = asyncio.create_task(sandbox.snapshot())
        await asyncio.wait_for(there.wait(), 60)
        snapshot.cancel()
        with pytest.raises(asyncio.CancelledError):
            await snapshot
        monkeypatch.undo()
        assert not sandbox.suspended and not frozen_now(sandbox._cgroups.dirs)
    finally:
        await sandbox.stop()


async def test_stopping_the_service_stops_a_sandbox_nobody_gave_back(
    tmp_path: Path, sweep: dict[str, list[Path]]
) -> None:
    root = tmp_path / "sb"
    service = SandboxEnvironmentService(_config(root))
    await service.start()
    try:
        spec = service.factory.spec("host")
        sandbox, _ = await service.pool.claim(spec, 30.0)  # and lost: a leak
        sweep.update(_owned_cgroups(root))
        await backends.suspend(sandbox)
    finally:
        await service.stop()
    assert _leftovers(root, sweep) == []


_SUSPENDER = """
import asyncio, sys
from pathlib import Path
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.v1 import env_pb2

async def main():
    service = SandboxEnvironmentService(EnvServiceConfig(root_dir=Path(sys.argv[1])))
    await service.start()
    created = await service.create_environment(env_pb2.CreateEnvironmentRequest(owner="t"))
    await service.execute_step(
        env_pb2.ExecuteStepRequest(env_id=created.env_id, command="sleep 1000 &")
    )
    await service.suspend_environment(env_pb2.SuspendEnvironmentRequest(env_id=created.env_id))
    print("suspended", flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


async def test_the_next_service_reclaims_a_sandbox_a_crashed_one_left_frozen(
    tmp_path: Path, sweep: dict[str, list[Path]]
) -> None:
    root = tmp_path / "sb"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _SUSPENDER,
        str(root),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"suspended\n"
        sweep.update(_owned_cgroups(root))
        assert len(sweep) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    dirs = next(iter(sweep.values()))
    # Its service is gone, yet the frozen sandbox stays (bwrap's die-with-parent
    # SIGKILL waits for a thaw)...
    assert frozen_now(dirs) and cgroup_pids(dirs)
    # ...until the next service on its folder reclaims it.
    async with SandboxEnvironmentService(_config(root)):
        pass
    assert _leftovers(root, sweep) == []
