"""cgroup detection and per-sandbox cgroups, on the real cgroup filesystem."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megaflow.env.local import LocalSandbox, cgroup_support
from megaflow.env.local.cgroups import (
    SandboxCgroups,
    _detect_v2,
    _folder,
    _Mount,
    _unescape,
    cgroup_layout,
    remove_cgroup_dirs,
)

pytestmark = pytest.mark.integration

needs_cgroups = pytest.mark.skipif(
    cgroup_support().version == "none", reason=f"no cgroups: {cgroup_support().detail}"
)


def test_support_report_is_consistent() -> None:
    support = cgroup_support()
    assert support.detail
    if support.version == "none":
        assert not support.memory and not support.pids
    else:
        assert support.memory or support.pids
        assert cgroup_layout().bases


def test_mountinfo_helpers() -> None:
    assert _unescape(r"/sys/fs/cgroup/with\040space") == "/sys/fs/cgroup/with space"
    mount = _Mount("/outer", Path("/sys/fs/cgroup/memory"), "cgroup", frozenset({"memory"}))
    assert _folder(mount, "/outer/inner/x") == Path("/sys/fs/cgroup/memory/inner/x")
    assert _folder(mount, "/outer") == Path("/sys/fs/cgroup/memory")
    assert _folder(mount, "/elsewhere") is None
    assert _folder(mount, "/outerly") is None


def test_v2_detection_reports_why_a_tree_is_unusable(tmp_path: Path) -> None:
    own = tmp_path / "a"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu io\n")
    (own / "cgroup.subtree_control").write_text("")
    mount = _Mount("/", tmp_path, "cgroup2", frozenset())
    layout = _detect_v2([mount], {"": "/a"})
    assert layout is not None and layout.support.version == "none"
    assert "unusable" in layout.support.detail


def test_remove_refuses_folders_outside_the_cgroup_fs(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-cgroup"
    folder.mkdir()
    remove_cgroup_dirs([folder], timeout_s=0.1)
    assert folder.is_dir()


@needs_cgroups
def test_sandbox_cgroups_limits_membership_and_removal() -> None:
    support = cgroup_support()
    name = f"megaflow-test-{secrets.token_hex(4)}"
    cgroups = SandboxCgroups.create(cgroup_layout(), name, memory_bytes=64 << 20, pids=10)
    try:
        assert cgroups.dirs and all(d.is_dir() and d.name == name for d in cgroups.dirs)
        files = {f.name: f for d in cgroups.dirs for f in d.iterdir()}
        if support.memory:
            memory = files.get("memory.limit_in_bytes") or files["memory.max"]
            assert memory.read_text().strip() == str(64 << 20)
        if support.pids:
            assert files["pids.max"].read_text().strip() == "10"
        joins = " && ".join(f"echo $$ > {p}" for p in cgroups.procs_files)
        child = subprocess.Popen(["/bin/sh", "-c", f"{joins} && exec sleep 100"])
        try:
            deadline = time.monotonic() + 5
            while child.pid not in cgroups.pids() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert cgroups.pids() == {child.pid}
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert cgroups.pids() == set()
    finally:
        cgroups.remove()
    assert not any(d.exists() for d in cgroups.dirs)


@needs_cgroups
async def test_sandbox_processes_live_in_limited_cgroups(tmp_path: Path) -> None:
    support = cgroup_support()
    sb = LocalSandbox("limited", root_dir=tmp_path, memory_mib=128, pids=50)
    await sb.start()
    try:
        dirs = [
            Path(p) for p in json.loads((tmp_path / "limited/owner.json").read_text())["cgroups"]
        ]
        assert dirs and all(d.is_dir() for d in dirs)
        result = await sb.execute("cat /proc/self/cgroup", 10)
        # Its own cgroup namespace: inside, its cgroups are the root; the host sees them.
        assert {line.rsplit(":", 1)[-1] for line in result.output.splitlines()} == {"/"}
        assert sb._shell is not None
        host_view = Path(f"/proc/{sb._shell.pid}/cgroup").read_text()
        for folder in dirs:
            assert f"/{folder.name}\n" in host_view
        files = {f.name: f for d in dirs for f in d.iterdir()}
        if support.memory:
            memory = files.get("memory.limit_in_bytes") or files["memory.max"]
            assert memory.read_text().strip() == str(128 << 20)
        if support.pids:
            assert files["pids.max"].read_text().strip() == "50"
            assert int(files["pids.current"].read_text()) >= 3  # bwrap, init, shell
    finally:
        await sb.stop()
    assert not any(d.exists() for d in dirs)
