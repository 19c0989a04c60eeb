"""Issue 17's "Found" list as containment-battery cases: each was a hole found on
``main`` by an independent tester, and each must stay blocked on every backend.

Host secrets readable (root-only files in the host's /etc, /opt, /usr/local/etc), host
information in /proc (keys, timer_list, mountinfo's host paths, pid 1's command
line), disk and inodes exhausted by default (2 GiB into /workspace and /tmp, 200,000
files), snapshots amplifying sparse files, and a zombie left by a shell's own ``exit``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.v1 import env_pb2
from tests.security.conftest import Arena, failed

pytestmark = pytest.mark.integration

ENOSPC = "No space left on device"
SPARSE_HOLE = (
    "Docker snapshots read the workspace through the container's tar, which expands sparse files"
)


@pytest.fixture(params=["/etc", "/opt", "/usr/local/etc"])
def root_only_file(request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """A 0600 root-owned file planted in a host folder that the local backend binds."""
    folder = Path(request.param)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(16)
    path = folder / f".megaflow-found-{secrets.token_hex(6)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    try:
        yield path, secret
    finally:
        path.unlink()
        if made:
            folder.rmdir()


async def test_root_only_host_files_unreadable(
    arena: Arena, root_only_file: tuple[Path, str]
) -> None:
    path, secret = root_only_file
    r = await arena.step(f"cat {path}; base64 < {path}; cp {path} /workspace/stolen")
    assert failed(r)
    assert secret not in r.output, r.output
    assert not (await arena.step("cat /workspace/stolen")).output.count(secret)
    await arena.assert_contained()


async def test_proc_keys_and_timer_list_reveal_nothing(arena: Arena) -> None:
    r = await arena.step(
        "for f in /proc/keys /proc/timer_list; do cat $f 2>/dev/null; done | wc -c"
    )
    assert r.output.split()[-1] == "0", r.output
    await arena.assert_contained()


@pytest.mark.hole_on("docker", reason="Docker's masked paths leave /proc/key-users readable (runc)")
async def test_proc_key_users_reveals_nothing(arena: Arena) -> None:
    # Per-uid key counts and quotas of the whole host's users.
    r = await arena.step("cat /proc/key-users 2>/dev/null | wc -c")
    assert r.output.split()[-1] == "0", r.output
    await arena.assert_contained()


def _host_markers(arena: Arena) -> list[str]:
    """Strings that name the host's side of the sandbox: the service's root folder,
    the test's temporary folders, the private dockerd's folder."""
    marks = [str(arena.service.config.root_dir), str(arena.host_dir.parent), "/var/lib/docker"]
    if arena.dockerd is not None:
        marks.append(str(arena.dockerd.dir))
    return marks


@pytest.mark.hole_on(
    "docker",
    reason="runc: Docker's own mounts (data root, layer ids, hosts/resolv.conf) show "
    "host paths; see docs/docker-sandboxes.md",
)
async def test_mountinfo_names_no_host_path(arena: Arena) -> None:
    r = await arena.step("cat /proc/self/mountinfo /proc/1/mountinfo")
    assert r.exit_code == 0, r.output
    leaked = [m for m in _host_markers(arena) if m in r.output]
    roots = [line.split()[3] for line in r.output.splitlines() if len(line.split()) > 4]
    leaked += [root for root in roots if root.startswith(("/tmp/", "/var/lib/", "/root/"))]
    assert not leaked, r.output
    await arena.assert_contained()


async def test_pid1_command_line_names_nothing_of_the_host(arena: Arena) -> None:
    r = await arena.step("tr '\\0' ' ' < /proc/1/cmdline; echo; tr '\\0' ' ' < /proc/1/environ")
    assert r.exit_code == 0, r.output
    assert not [m for m in _host_markers(arena) if m in r.output], r.output
    assert "--bind" not in r.output and arena.attacker not in r.output, r.output
    await arena.assert_contained()


async def test_two_gib_into_workspace_hits_enospc_by_default(arena: Arena) -> None:
    r = await arena.step("dd if=/dev/zero of=/workspace/fill bs=1M count=2048", timeout_s=60.0)
    assert failed(r) and ENOSPC in r.output, r.output
    await arena.step("rm -f /workspace/fill")
    await arena.assert_contained()


async def test_two_gib_into_tmp_hits_enospc_by_default(arena: Arena) -> None:
    r = await arena.step("dd if=/dev/zero of=/tmp/fill bs=1M count=2048", timeout_s=60.0)
    assert failed(r) and ENOSPC in r.output, r.output
    await arena.step("rm -f /tmp/fill")
    await arena.assert_contained()


@pytest.mark.hole_on(
    "gvisor",
    reason="this runsc (2022-12-19) ignores tmpfs nr_inodes: the sandbox dies instead of ENOSPC",
)
async def test_two_hundred_thousand_files_hit_enospc_by_default(arena: Arena) -> None:
    r = await arena.step(
        "mkdir many && cd many && seq 200000 | xargs touch 2>&1 | head -1; ls | wc -l",
        timeout_s=60.0,
    )
    assert ENOSPC in r.output, r.output
    assert int(r.output.split()[-1]) < 200_000, r.output
    await arena.step("rm -rf /workspace/many", timeout_s=60.0)
    await arena.assert_contained()


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.mark.hole_on(
    "docker",
    reason=SPARSE_HOLE + " (capped: fails as too large)",
)
@pytest.mark.hole_on(
    "gvisor",
    reason=SPARSE_HOLE + " (gVisor: times out)",
)
async def test_sparse_file_snapshot_stays_small(arena: Arena) -> None:
    r = await arena.step("truncate -s 900M /workspace/sparse && echo ok")
    assert r.output.strip() == "ok", r.output
    _peak_rss_reset()
    before = _peak_rss()
    snap = await arena.service.snapshot_environment(
        env_pb2.SnapshotEnvironmentRequest(env_id=arena.attacker)
    )
    grown = _peak_rss() - before
    assert snap.bytes < 16 * 1024 * 1024, snap.bytes
    assert grown < 200 * 1024 * 1024, grown
    await arena.step("rm -f /workspace/sparse")
    await arena.assert_contained()


async def test_exit_leaves_no_zombie(arena: Arena) -> None:
    zombies_before = _zombies()
    r = await arena.step("exit 3")
    assert r.exit_code == 3 or "shell" in r.output, r.output
    assert (await arena.step("echo back")).output.strip().endswith("back")
    new = {pid: comm for pid, comm in _zombies().items() if pid not in zombies_before}
    mine = {pid: comm for pid, comm in new.items() if comm in ("bwrap", "bash", "setpriv")}
    assert not mine, mine
    await arena.assert_contained()


def _zombies() -> dict[int, str]:
    """Zombie processes on the host whose parent is pid 1 (left to the host's init)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] == "Z" and fields[1] == "1":
            found[int(name)] = comm
    return found
