"""Issue 17's hardening of the local backend: an unprivileged workload uid, /proc that
names nothing of the host, default disk and inode quotas, no zombie on ``exit``, and
snapshots that keep sparse files sparse and are capped.

Real bubblewrap, real tmpfs mounts, real GNU tar; nothing is mocked.
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.config import EnvServiceConfig
from megaflow.env.local import LocalSandbox, procs
from megaflow.env.local.backend import LocalBackend, LocalBackendConfig
from megaflow.env.local.quota import default_disk_mib, default_tmp_mib, inodes_for
from megaflow.env.local.sandbox import SANDBOX_UID
from megaflow.env.local.workspace import pack
from megaflow.env.registry import SandboxSpec

pytestmark = pytest.mark.integration


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    sb = LocalSandbox("hard", root_dir=tmp_path / "sandboxes", memory_mib=128)
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
def root_only_file() -> Iterator[tuple[Path, str]]:
    """A 0600 root file in the host's /etc (bound into every host-image sandbox)."""
    secret = secrets.token_hex(16)
    path = Path("/etc") / f".megaflow-test-{secrets.token_hex(6)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    try:
        yield path, secret
    finally:
        path.unlink()


async def test_workload_is_an_unprivileged_host_uid(
    sandbox: LocalSandbox, root_only_file: tuple[Path, str]
) -> None:
    path, secret = root_only_file
    r = await sandbox.execute(f"id -u; cat {path}; sleep 30 & echo $!", 10)
    assert r.output.startswith("0\n")  # root inside its user namespace only
    assert secret not in r.output and "Permission denied" in r.output
    members = sandbox._members()
    assert members
    for m in members:
        status = Path(f"/proc/{m.host_pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uids.split()[1:] == [str(SANDBOX_UID)] * 4, (m, uids)


async def test_files_the_service_writes_belong_to_the_workload(sandbox: LocalSandbox) -> None:
    await sandbox.put_files({"pkg/mod.py": b"x = 1\n"})
    archive = await sandbox.snapshot()
    await sandbox.restore(archive)
    r = await sandbox.execute("echo y >> pkg/mod.py && mkdir pkg/sub && cat pkg/mod.py", 10)
    assert r.exit_code == 0 and r.output == "x = 1\ny\n", r.output
    for path in (sandbox.host_workspace / "pkg", sandbox.host_workspace / "pkg/mod.py"):
        assert path.stat().st_uid == SANDBOX_UID


async def test_proc_names_nothing_of_the_host(sandbox: LocalSandbox, tmp_path: Path) -> None:
    r = await sandbox.execute(
        "for f in /proc/keys /proc/timer_list; do cat $f 2>/dev/null; done | wc -c; "
        "tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/self/mountinfo /proc/self/cgroup",
        10,
    )
    lines = r.output.splitlines()
    assert lines[0] == "0"
    assert "bwrap" not in lines[1] and "--bind" not in lines[1], lines[1]
    assert str(tmp_path) not in r.output and sandbox.sandbox_id not in r.output


async def test_default_quotas_give_enospc(sandbox: LocalSandbox) -> None:
    assert default_disk_mib(128) == 64 and default_tmp_mib(128) == 32
    big = await sandbox.execute("head -c 2G /dev/zero > /workspace/fill", 30)
    assert big.exit_code != 0 and "No space left on device" in big.output, big.output
    tmp = await sandbox.execute("rm -f /workspace/fill; head -c 2G /dev/zero > /tmp/fill", 30)
    assert tmp.exit_code != 0 and "No space left on device" in tmp.output, tmp.output
    files = await sandbox.execute(
        "rm -f /tmp/fill; mkdir many && cd many && seq 200000 | xargs touch 2>&1 | head -1; "
        "ls | wc -l",
        60,
    )
    assert "No space left on device" in files.output, files.output
    assert int(files.output.split()[-1]) < inodes_for(64)
    assert (await sandbox.execute("cd /workspace && rm -rf many && echo ok", 30)).output == "ok\n"


async def test_exit_leaves_no_zombie(sandbox: LocalSandbox) -> None:
    await sandbox.execute("echo warm", 10)
    assert sandbox._shell is not None
    before = [m.host_pid for m in sandbox._members()] + [sandbox._shell.pid]
    r = await sandbox.execute("exit 7", 10)
    assert "a new shell was started" in r.output
    assert (await sandbox.execute("echo again", 10)).output == "again\n"
    left = {pid: procs.alive(pid, None) for pid in before if Path(f"/proc/{pid}").exists()}
    assert left == {}, left  # neither alive nor a zombie left to the host's init


async def test_sparse_file_snapshot_stays_small_and_restores_sparse(
    sandbox: LocalSandbox, tmp_path: Path
) -> None:
    r = await sandbox.execute("truncate -s 900M sparse && echo tail >> sparse && echo ok", 10)
    assert r.output == "ok\n"
    archive = await sandbox.snapshot()
    assert len(archive) < 1024 * 1024
    other = LocalSandbox("other", root_dir=tmp_path / "other", memory_mib=128)
    await other.start()
    try:
        await other.restore(archive)
        restored = other.host_workspace / "sparse"
        assert restored.stat().st_size == 900 * 1024 * 1024 + 5
        assert restored.stat().st_blocks * 512 < 1024 * 1024  # still sparse
        assert (await other.execute("tail -c 5 sparse", 10)).output == "tail\n"
    finally:
        await other.stop()


def test_snapshot_over_the_cap_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(os.urandom(2 * 1024 * 1024))
    with pytest.raises(InvalidRequestError, match="snapshot exceeds 1048576 bytes"):
        pack(tmp_path, max_bytes=1024 * 1024)
    archive = pack(tmp_path, max_bytes=4 * 1024 * 1024)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.getnames() == ["data"]


def test_root_uid_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="unprivileged"):
        LocalSandbox("x", root_dir=tmp_path, uid=0)


async def test_backend_settings_change_the_defaults(tmp_path: Path) -> None:
    backend = LocalBackend(
        EnvServiceConfig(root_dir=tmp_path / "sb"),
        LocalBackendConfig(disk_mib=24, tmp_mib=12, sandbox_uid=SANDBOX_UID + 1),
    )
    spec = SandboxSpec("local", "host", "", 128, 64, 65_536, 0, 0)
    sb = await backend.build("cfg", spec)
    await sb.start()
    try:
        r = await sb.execute("df -m /workspace /tmp | tail -2 | awk '{print $2}'", 10)
        assert r.output.split() == ["24", "12"], r.output
        assert sb.host_workspace.stat().st_uid == SANDBOX_UID + 1  # type: ignore[attr-defined]
    finally:
        await sb.stop()
