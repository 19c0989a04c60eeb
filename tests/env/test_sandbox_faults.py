"""The platform failing under a LocalSandbox (real bubblewrap, real cgroups): bwrap
killed from outside, or the sandbox hung (frozen from outside), is the platform's
failure: SandboxError (retryable) and a sandbox broken for good, that still stops
cleanly. What the task does to its own shell (``kill -9 $$``, a command that never
ends) stays the task's outcome: a new shell, a timed-out command."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import SandboxError
from megaflow.env.local import LocalSandbox, cgroup_support
from megaflow.env.local.freezer import request_freeze
from tests.env.test_local_sandbox import owner_cgroups, sandbox_pids

pytestmark = pytest.mark.integration

needs_memory = pytest.mark.skipif(
    not cgroup_support().memory, reason=f"no memory cgroup: {cgroup_support().detail}"
)
needs_freezer = pytest.mark.skipif(
    not cgroup_support().freezer, reason=f"no freezer: {cgroup_support().detail}"
)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    sb = LocalSandbox("faulty", root_dir=tmp_path / "sandboxes")
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


def _bwrap_pid(sb: LocalSandbox) -> int:
    assert sb._shell is not None
    return sb._shell.pid


async def _assert_stops_leaving_nothing(sb: LocalSandbox) -> None:
    pids, cgroups = sandbox_pids("faulty"), owner_cgroups(sb)
    await sb.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not any(p.exists() for p in cgroups)
    assert not sb.host_workspace.parent.exists()


async def test_bwrap_killed_from_outside_during_a_command_breaks_the_sandbox(
    sandbox: LocalSandbox,
) -> None:
    running = asyncio.create_task(sandbox.execute("sleep 30", timeout_s=60))
    await asyncio.sleep(0.2)
    os.kill(_bwrap_pid(sandbox), signal.SIGKILL)  # as `docker kill` would
    with pytest.raises(SandboxError, match=r"died under its command: .*killed from outside"):
        await running
    assert SandboxError.retryable and not sandbox.alive
    with pytest.raises(SandboxError, match="broken"):  # for good: no new shell in its place
        await sandbox.execute("echo hi", 10)
    await _assert_stops_leaving_nothing(sandbox)


async def test_bwrap_killed_from_outside_between_calls_breaks_the_sandbox(
    sandbox: LocalSandbox,
) -> None:
    await sandbox.execute("echo warm", 10)
    os.kill(_bwrap_pid(sandbox), signal.SIGKILL)
    await asyncio.sleep(0.2)
    with pytest.raises(SandboxError, match=r"died: bwrap was killed from outside \(signal 9\)"):
        await sandbox.execute("echo hi", 10)
    assert not sandbox.alive
    await _assert_stops_leaving_nothing(sandbox)


@needs_memory
async def test_bwrap_killed_by_the_sandboxs_own_memory_limit_is_the_tasks_doing(
    tmp_path: Path,
) -> None:
    # /tmp's quota above the memory limit: the memory limit, not ENOSPC, stops the fill.
    sb = LocalSandbox("oom", root_dir=tmp_path / "sandboxes", memory_mib=64, tmp_mib=512)
    await sb.start()
    try:
        # bwrap first in line for the OOM killer: filling the private /tmp (a tmpfs,
        # charged to the sandbox, freed by no kill) gets bwrap itself killed.
        Path(f"/proc/{_bwrap_pid(sb)}/oom_score_adj").write_text("1000")
        result = await sb.execute("head -c 200000000 /dev/zero > /tmp/fill", 30)
        assert sb._cgroups.oom_kills() > 0
        assert result.exit_code != 0 and "a new shell was started" in result.output
        assert sb.alive  # not broken: the task filled its own memory
        assert (await sb.execute("echo after", 10)).output == "after\n"
    finally:
        await sb.stop()


async def test_the_task_killing_its_own_shell_mid_command_is_not_a_platform_failure(
    sandbox: LocalSandbox,
) -> None:
    result = await sandbox.execute("echo before; kill -9 $$", 10)
    assert result.output.startswith("before\n") and "a new shell was started" in result.output
    assert sandbox.alive
    assert (await sandbox.execute("echo after", 10)).output == "after\n"


@needs_freezer
async def test_a_sandbox_frozen_from_outside_is_hung_at_its_commands_timeout(
    sandbox: LocalSandbox,
) -> None:
    await sandbox.execute("echo warm", 10)
    control = sandbox._cgroups.freezer_file
    assert control is not None
    request_freeze(control, True)  # as `docker pause` or a stuck freezer would
    with pytest.raises(SandboxError, match="hung: frozen from outside"):
        await sandbox.execute("echo hi", timeout_s=0.5)
    assert not sandbox.alive
    with pytest.raises(SandboxError, match="broken"):
        await sandbox.execute("echo hi", 10)
    await _assert_stops_leaving_nothing(sandbox)  # thawed, so its processes could die


@needs_freezer
async def test_a_hang_under_a_long_command_is_found_long_before_its_timeout(
    sandbox: LocalSandbox,
) -> None:
    control = sandbox._cgroups.freezer_file
    assert control is not None
    running = asyncio.create_task(sandbox.execute("sleep 600", timeout_s=600))
    await asyncio.sleep(0.2)
    request_freeze(control, True)
    started = time.monotonic()
    with pytest.raises(SandboxError, match="hung: frozen from outside"):
        await asyncio.wait_for(running, 60)  # checked every HANG_CHECK_S, not at 600 s
    assert time.monotonic() - started < 60
    await _assert_stops_leaving_nothing(sandbox)


@needs_freezer
async def test_a_sandbox_frozen_from_outside_while_idle_stops_cleanly(
    sandbox: LocalSandbox,
) -> None:
    control = sandbox._cgroups.freezer_file
    assert control is not None
    request_freeze(control, True)
    await asyncio.sleep(0.1)
    await _assert_stops_leaving_nothing(sandbox)


async def test_a_command_that_never_ends_is_the_tasks_timeout_not_a_hang(
    sandbox: LocalSandbox,
) -> None:
    result = await sandbox.execute("sleep 30", timeout_s=0.5)
    assert result.timed_out and result.exit_code == 137
    assert sandbox.alive
    assert (await sandbox.execute("echo up", 10)).output == "up\n"
