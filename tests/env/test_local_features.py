"""LocalSandbox suspend/resume, snapshots, uploads, disk quota, CPU share and images.

Real bubblewrap, real cgroups, real tmpfs mounts; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.images.build import build_busybox_rootfs
from megaflow.env.local import LocalSandbox, cgroup_support, reclaim_orphans
from megaflow.env.local.quota import mount_workspace
from megaflow.env.sandbox import Sandbox

pytestmark = pytest.mark.integration

needs_freezer = pytest.mark.skipif(
    not cgroup_support().freezer, reason=f"no freezer: {cgroup_support().detail}"
)
needs_cpu = pytest.mark.skipif(
    not cgroup_support().cpu, reason=f"no cpu cgroup: {cgroup_support().detail}"
)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    sb = LocalSandbox("feat", root_dir=tmp_path / "sandboxes")
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, *, symlink_to: str | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    if symlink_to is not None:
        info.type, info.linkname = tarfile.SYMTYPE, symlink_to
    info.mode = 0o644
    return info


def freezer_state(sb: LocalSandbox) -> str:
    control = sb._cgroups.freezer_file
    assert control is not None
    if control.name == "freezer.state":
        return control.read_text().strip()
    return "FROZEN" if "frozen 1" in (control.parent / "cgroup.events").read_text() else "THAWED"


def read_counter(path: Path) -> int:
    """The loop rewrites the file all the time: retry until a whole number is read."""
    for _ in range(1000):
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.005)
    raise AssertionError(f"{path} stays empty")


def test_local_sandbox_satisfies_the_protocol(tmp_path: Path) -> None:
    sb: Sandbox = LocalSandbox("proto", root_dir=tmp_path)
    assert sb.workdir == "/workspace"


# -- suspend / resume ----------------------------------------------------------------------


@needs_freezer
async def test_suspend_stops_progress_and_execute_resumes(sandbox: LocalSandbox) -> None:
    counter = sandbox.host_workspace / "n"
    loop = "i=0; while :; do i=$((i+1)); echo $i > /workspace/n; done"
    await sandbox.execute(f"({loop}) >/dev/null 2>&1 &", 10)
    read_counter(counter)
    await sandbox.suspend()
    assert sandbox.suspended and freezer_state(sandbox) == "FROZEN"
    before = counter.read_text()  # frozen: no torn write can be in progress... or one is
    time.sleep(0.3)  # a running loop would advance thousands of times meanwhile
    assert counter.read_text() == before
    result = await sandbox.execute("cat /workspace/n", 10)  # resumes first
    assert result.exit_code == 0 and not sandbox.suspended
    assert freezer_state(sandbox) == "THAWED"
    time.sleep(0.2)
    assert read_counter(counter) > int(before or 0)
    await sandbox.resume()  # no-op when not suspended


@needs_freezer
async def test_stop_while_suspended_leaves_nothing(tmp_path: Path) -> None:
    sb = LocalSandbox("frozen", root_dir=tmp_path)
    await sb.start()
    await sb.execute("sleep 1000 &", 10)
    cgroups = [Path(p) for p in json.loads((tmp_path / "frozen/owner.json").read_text())["cgroups"]]
    await sb.suspend()
    await sb.stop()
    assert not any(p.exists() for p in cgroups)
    assert not (tmp_path / "frozen").exists()


# -- put_files, snapshot, restore ----------------------------------------------------------


async def test_put_files_writes_and_refuses_escapes(sandbox: LocalSandbox) -> None:
    await sandbox.put_files({"src/pkg/a.py": b"print(1)\n", "README": b"hi"})
    result = await sandbox.execute("cat src/pkg/a.py README", 10)
    assert result.output == "print(1)\nhi"
    for bad in ("/etc/evil", "../evil", "src/../../evil", ""):
        with pytest.raises(InvalidRequestError):
            await sandbox.put_files({bad: b"x"})
    outside = sandbox.host_workspace.parent / "outside"
    outside.mkdir()
    await sandbox.execute(f"ln -s {outside} /workspace/link", 10)  # a planted symlink
    with pytest.raises(InvalidRequestError, match="symlink"):
        await sandbox.put_files({"link/evil": b"x"})
    assert list(outside.iterdir()) == []


async def test_snapshot_restores_into_a_new_sandbox(sandbox: LocalSandbox, tmp_path: Path) -> None:
    await sandbox.execute(
        "mkdir -p d/e && echo one > d/e/f && printf '#!/bin/sh\\necho ran\\n' > run.sh"
        " && chmod +x run.sh && ln -s d/e/f rel && ln -s /usr/bin/env abs",
        10,
    )
    archive = await sandbox.snapshot()
    other = LocalSandbox("restored", root_dir=tmp_path / "sandboxes")
    await other.start()
    try:
        await other.put_files({"stale": b"old"})
        await other.restore(archive)
        result = await other.execute("cat d/e/f rel; ./run.sh; readlink abs; ls stale", 10)
        assert result.output.startswith("one\none\nran\n/usr/bin/env\n")
        assert "No such file" in result.output
    finally:
        await other.stop()


async def test_hostile_archives_are_refused_or_neutralised(sandbox: LocalSandbox) -> None:
    name = f"megaflow-test-{secrets.token_hex(4)}"
    await sandbox.put_files({"keep": b"k"})
    hostile = [
        [(member(f"../{name}"), b"x")],
        [(member("etc", symlink_to="/etc"), b""), (member(f"etc/{name}"), b"x")],
        [(member("up", symlink_to="../../.."), b"")],
    ]
    for entries in hostile:
        with pytest.raises(InvalidRequestError, match="unsafe"):
            await sandbox.restore(tar_of(entries))
        assert (sandbox.host_workspace / "keep").read_bytes() == b"k"  # unchanged
    assert not Path(f"/etc/{name}").exists()
    assert not (sandbox.host_workspace.parent.parent / name).exists()
    with pytest.raises(InvalidRequestError):
        await sandbox.restore(b"not a tar archive")
    # An absolute member path is made relative: it lands inside the workspace.
    await sandbox.restore(tar_of([(member(f"/tmp/{name}"), b"abs")]))
    assert not Path(f"/tmp/{name}").exists()
    assert (sandbox.host_workspace / "tmp" / name).read_bytes() == b"abs"
    assert not (sandbox.host_workspace / "keep").exists()


# -- limits --------------------------------------------------------------------------------


async def test_disk_quota_gives_enospc_and_the_sandbox_survives(tmp_path: Path) -> None:
    host_free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    sb = LocalSandbox("quota", root_dir=tmp_path, disk_mib=16)
    await sb.start()
    try:
        assert os.path.ismount(sb.host_workspace.parent)  # the sandbox folder is the quota
        fill = await sb.execute("head -c 64M /dev/zero > /workspace/big; echo rc=$?", 30)
        assert "No space left on device" in fill.output and "rc=1" in fill.output
        assert (sb.host_workspace / "big").stat().st_size <= 16 * 1024 * 1024
        host_free_now = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
        assert host_free - host_free_now < 8 * 1024 * 1024  # not written to the host disk
        with pytest.raises(InvalidRequestError, match="full"):
            await sb.put_files({"more": b"x" * 1024 * 1024})
        ok = await sb.execute("rm /workspace/big && echo fine > /workspace/small && cat small", 10)
        assert ok.output == "fine\n"
    finally:
        await sb.stop()
    assert not (tmp_path / "quota").exists()
    assert str(tmp_path / "quota") not in Path("/proc/self/mounts").read_text()


async def test_reclaim_unmounts_a_dead_owners_quota(tmp_path: Path) -> None:
    folder = tmp_path / "dead"
    (folder / "workspace").mkdir(parents=True)
    mount_workspace(folder / "workspace", 4)
    record = {"pid": 2**22 + 12345, "start_ticks": 1, "cgroups": []}  # no such process
    (folder / "owner.json").write_text(json.dumps(record))
    assert reclaim_orphans(tmp_path) == 1
    assert not folder.exists()
    assert str(folder) not in Path("/proc/self/mounts").read_text()


@needs_cpu
async def test_cpu_shares_are_written_to_the_cgroup(tmp_path: Path) -> None:
    sb = LocalSandbox("cpu", root_dir=tmp_path, cpu_shares=256)
    await sb.start()
    try:
        dirs = sb._cgroups.dirs
        values = [
            (d / f).read_text().strip()
            for d in dirs
            for f in ("cpu.shares", "cpu.weight")
            if (d / f).exists()
        ]
        assert values and values[0] in ("256", "10")
    finally:
        await sb.stop()


async def test_invalid_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        LocalSandbox("x", root_dir=tmp_path, cpu_shares=1)
    with pytest.raises(InvalidRequestError):
        LocalSandbox("x", root_dir=tmp_path, disk_mib=-1)


# -- images ----------------------------------------------------------------------------------


async def test_busybox_rootfs_hides_the_host_usr(tmp_path: Path) -> None:
    root = build_busybox_rootfs(tmp_path / "rootfs")
    sb = LocalSandbox("bb", root_dir=tmp_path / "sb", image_root=root)
    await sb.start()
    try:
        result = await sb.execute(
            "ls /usr/bin/busybox; test -e /usr/bin/bwrap || echo no-bwrap;"
            " test -e /usr/bin/python3 || echo no-python; ls /usr/lib; cat /etc/hostname",
            10,
        )
        assert result.output == "/usr/bin/busybox\nno-bwrap\nno-python\nx86_64-linux-gnu\nbusybox\n"
        await sb.write_file("x/y", b"data")
        assert await sb.read_file("x/y") == b"data"
    finally:
        await sb.stop()


async def test_image_without_bash_is_refused(tmp_path: Path) -> None:
    root = build_busybox_rootfs(tmp_path / "rootfs", with_bash=False)
    sb = LocalSandbox("nobash", root_dir=tmp_path / "sb", image_root=root)
    with pytest.raises(InvalidRequestError, match="bash"):
        await sb.start()
    assert not (tmp_path / "sb" / "nobash").exists()


# -- kernel interfaces beyond the namespaces ---------------------------------------------------


async def test_sysctls_keyrings_and_user_namespaces_are_closed(sandbox: LocalSandbox) -> None:
    sysctl = await sandbox.execute("echo 4 > /proc/sys/vm/drop_caches", 10)
    assert sysctl.exit_code != 0 and "Read-only file system" in sysctl.output
    userns = await sandbox.execute("unshare -U true", 10)
    assert userns.exit_code != 0 and "Operation not permitted" in userns.output
    keyring = await sandbox.execute(
        "python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
        'r = libc.syscall(248, b"user", b"megaflow", b"v", 1, ctypes.c_int(-4)); '
        "print(r, ctypes.get_errno())'",  # add_key into the user keyring
        10,
    )
    assert keyring.output == "-1 1\n"  # EPERM
    ok = await sandbox.execute(
        "python3 -c 'import os, threading; t = threading.Thread(target=print, args=(1,)); "
        "t.start(); t.join(); pid = os.fork(); os._exit(0) if pid == 0 else print(2)'",
        10,
    )
    assert ok.output == "1\n2\n"  # threads and fork still work


async def test_service_environment_is_not_visible(tmp_path: Path) -> None:
    secret = f"megaflow-secret-{secrets.token_hex(4)}"
    os.environ["MEGAFLOW_TEST_SECRET"] = secret
    try:
        sb = LocalSandbox("env", root_dir=tmp_path)
        await sb.start()
    finally:
        del os.environ["MEGAFLOW_TEST_SECRET"]
    try:
        result = await sb.execute("cat /proc/1/environ /proc/self/environ | tr '\\0' '\\n'", 10)
        assert secret not in result.output and "PATH=" in result.output
    finally:
        await sb.stop()


def test_an_unowned_folder_of_a_dead_creator_is_reclaimed_at_once(tmp_path: Path) -> None:
    # Killed between making the folder and writing owner.json: the name holds the pid.
    dead = tmp_path / f"sb-{2**22 + 12345}-abc123-0"
    (dead / "workspace").mkdir(parents=True)
    mine = tmp_path / f"sb-{os.getpid()}-abc123-1"  # a live creator: maybe still starting
    (mine / "workspace").mkdir(parents=True)
    assert reclaim_orphans(tmp_path) == 1
    assert not dead.exists() and mine.exists()
