"""LocalSandbox against real bubblewrap and real cgroups (no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.local import LocalSandbox, cgroup_support, reclaim_orphans
from megaflow.env.local import sandbox as sandbox_module
from megaflow.env.local.cgroups import _none
from megaflow.env.local.shell import ansi_c_quote
from megaflow.env.shell import OutputCollector
from megaflow.testing.processes import pids_mentioning

pytestmark = pytest.mark.integration

needs_memory_cgroup = pytest.mark.skipif(
    not cgroup_support().memory, reason=f"no memory cgroup: {cgroup_support().detail}"
)
needs_pids_cgroup = pytest.mark.skipif(
    not cgroup_support().pids, reason=f"no pids cgroup: {cgroup_support().detail}"
)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    sb = LocalSandbox("sb", root_dir=tmp_path / "sandboxes")
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


def sandbox_pids(sandbox_id: str) -> set[int]:
    """Host pids whose cgroup (or pid namespace) belongs to the sandbox, found via /proc."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cgroups = Path(f"/proc/{name}/cgroup").read_text()
        except OSError:
            continue
        if f"/megaflow-{sandbox_id}-" in cgroups:
            found.add(int(name))
    return found


def _state(pid: int) -> str:
    """``state command`` of a process from /proc (for assertion messages)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return f"{stat[stat.rfind(')') + 2 :].split()[0]} {stat[stat.find('(') + 1 : stat.rfind(')')]}"


def owner_cgroups(sb: LocalSandbox) -> list[Path]:
    record = json.loads((sb.host_workspace.parent / "owner.json").read_text())
    return [Path(p) for p in record["cgroups"]]


# -- isolation ---------------------------------------------------------------------------


async def test_writes_outside_workspace_fail_and_inside_reach_host(sandbox: LocalSandbox) -> None:
    name = f"megaflow-test-{secrets.token_hex(4)}"
    for target in (f"/etc/{name}", f"/{name}", f"/usr/{name}", f"/opt/{name}"):
        result = await sandbox.execute(f"touch {target}", timeout_s=10)
        assert result.exit_code != 0, target
        assert "Read-only file system" in result.output
        assert not Path(target).exists()
    result = await sandbox.execute("echo data > /workspace/out.txt && touch /tmp/t", 10)
    assert result.exit_code == 0, result.output
    assert (sandbox.host_workspace / "out.txt").read_text() == "data\n"


async def test_no_network(sandbox: LocalSandbox) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = await sandbox.execute(f'python3 -c "{probe}"', timeout_s=10)
        assert result.exit_code != 0
        assert "Connection refused" in result.output
        with pytest.raises(BlockingIOError):
            listener.accept()
    outside = await sandbox.execute(
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\"", 10
    )
    assert outside.exit_code != 0
    assert "unreachable" in outside.output
    interfaces = await sandbox.execute("tail -n +3 /proc/net/dev | cut -d: -f1", 10)
    assert interfaces.output.split() == ["lo"]


async def test_host_secrets_invisible(sandbox: LocalSandbox, tmp_path: Path) -> None:
    for path in ("/root", "/work", "/home", "/var", str(tmp_path)):
        result = await sandbox.execute(f"ls {path}", timeout_s=10)
        assert result.exit_code != 0, path
        assert "No such file or directory" in result.output
    shadow = await sandbox.execute("cat /etc/shadow", timeout_s=10)
    assert "root:" not in shadow.output
    caps = await sandbox.execute("grep CapEff /proc/self/status", timeout_s=10)
    assert caps.output.split() == ["CapEff:", "0000000000000000"]
    remount = await sandbox.execute("mount -o remount,rw /usr", timeout_s=10)
    assert remount.exit_code != 0


async def test_host_mounts_unchanged(tmp_path: Path) -> None:
    before = Path("/proc/self/mounts").read_text()
    sb = LocalSandbox("mnt", root_dir=tmp_path)
    await sb.start()
    assert (await sb.execute("echo hi", 10)).output == "hi\n"
    # Only the sandbox's own quota tmpfs mounts (its folder and its /tmp) are added.
    added = set(Path("/proc/self/mounts").read_text().splitlines()) - set(before.splitlines())
    assert sorted(line.split()[1] for line in added) == [
        str(tmp_path / "mnt"),
        str(tmp_path / "mnt" / "tmp"),
    ]
    assert all("nosuid,nodev" in line for line in added)
    await sb.stop()
    assert Path("/proc/self/mounts").read_text() == before


# -- the persistent shell --------------------------------------------------------------


async def test_cd_and_export_persist(sandbox: LocalSandbox) -> None:
    await sandbox.execute("mkdir -p /workspace/a/b && cd /workspace/a/b", 10)
    await sandbox.execute("export GREETING='hello world'; f() { echo fn; }", 10)
    result = await sandbox.execute('pwd; echo "$GREETING"; f', 10)
    assert result.output == "/workspace/a/b\nhello world\nfn\n"
    assert await sandbox.cwd() == "/workspace/a/b"


async def test_environment_is_clean(sandbox: LocalSandbox) -> None:
    result = await sandbox.execute("env | sort", 10)
    variables = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
    assert variables["HOME"] == "/workspace"
    assert variables["PATH"].startswith("/usr/local/bin:/usr/bin:/bin")
    assert variables["LANG"] == "C.UTF-8"
    assert not any(key.startswith(("PYTEST", "VIRTUAL_ENV")) for key in variables)


async def test_exit_codes_stderr_and_unicode(sandbox: LocalSandbox) -> None:
    result = await sandbox.execute("echo out; echo err >&2; exit_fn() { return 7; }; exit_fn", 10)
    assert (result.output, result.exit_code, result.timed_out) == ("out\nerr\n", 7, False)
    weird = r"""printf '%s|' 'it''s' "dq \"x\"" $'tab\there' 'é ✓' back\\slash"""
    expected = 'its|dq "x"|tab\there|é ✓|back\\slash|'
    assert (await sandbox.execute(weird, 10)).output == expected
    multi = await sandbox.execute("for i in 1 2; do\n  echo $i\ndone", 10)
    assert multi.output == "1\n2\n"


async def test_commands_cannot_read_the_control_channel(sandbox: LocalSandbox) -> None:
    result = await sandbox.execute("cat; read -r line; echo rc=$?", timeout_s=5)
    assert result.output == "rc=1\n"
    assert not result.timed_out


async def test_shell_exit_starts_a_new_shell(sandbox: LocalSandbox) -> None:
    await sandbox.execute("echo keep > /workspace/f; cd /tmp", 10)
    result = await sandbox.execute("exit 3", 10)
    assert result.exit_code == 3
    assert "a new shell was started" in result.output
    after = await sandbox.execute("cat /workspace/f; pwd", 10)
    assert after.output == "keep\n/workspace\n"
    assert sandbox.alive


async def test_invalid_requests(sandbox: LocalSandbox) -> None:
    for command, timeout_s in (("", 1.0), ("   ", 1.0), ("echo \0", 1.0), ("echo", -1.0)):
        with pytest.raises(InvalidRequestError):
            await sandbox.execute(command, timeout_s)
    with pytest.raises(InvalidRequestError):
        await sandbox.execute("echo", float("nan"))
    with pytest.raises(InvalidRequestError):
        LocalSandbox("../escape", root_dir=Path("/tmp"))
    assert (await sandbox.execute("echo fine", 10)).output == "fine\n"


# -- timeouts and limits ---------------------------------------------------------------


async def test_timeout_kills_command_and_daemons(sandbox: LocalSandbox) -> None:
    await sandbox.execute("cd /tmp && export KEEP=yes", 10)
    started = time.monotonic()
    result = await sandbox.execute(
        "sleep 1000 & (setsid sleep 1001 &); echo started; sleep 30", timeout_s=1
    )
    assert time.monotonic() - started < 5
    assert result.timed_out and result.exit_code == 137
    assert result.output.startswith("started\n")
    assert "timed out" in result.output
    after = await sandbox.execute("cat /proc/[0-9]*/comm; pwd; echo $KEEP", 10)
    deadline = time.monotonic() + 5  # a killed daemon may await reaping by pid 1 a moment
    while "sleep" in after.output and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        after = await sandbox.execute("cat /proc/[0-9]*/comm; pwd; echo $KEEP", 10)
    assert "sleep" not in after.output
    assert after.output.endswith("/tmp\nyes\n")
    assert not after.timed_out


async def test_timeout_interrupts_shell_builtin_loop(sandbox: LocalSandbox) -> None:
    await sandbox.execute("export KEEP=1; loop() { while :; do :; done; }", 10)
    result = await sandbox.execute("loop; echo not-reached", timeout_s=0.5)
    assert result.timed_out and result.exit_code == 137
    assert "not-reached" not in result.output
    after = await sandbox.execute("echo $KEEP", 10)
    assert after.output == "1\n"


async def test_cancelled_execute_leaves_sandbox_usable(sandbox: LocalSandbox) -> None:
    await sandbox.execute("export KEEP=2", 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await sandbox.execute("sleep 30; echo late", timeout_s=60)
    after = await sandbox.execute("echo $KEEP", 10)
    assert after.output == "2\n"


async def test_shell_killed_while_idle_is_replaced(sandbox: LocalSandbox) -> None:
    await sandbox.execute("(sleep 0.1; kill -9 $$) >/dev/null 2>&1 &", 10)
    await asyncio.sleep(0.5)
    result = await sandbox.execute("echo hi", 10)
    assert result.output == "[megaflow: the shell exited; a new shell was started]\nhi\n"
    assert result.exit_code == 0 and sandbox.alive


async def test_stop_during_a_command(sandbox: LocalSandbox) -> None:
    running = asyncio.create_task(sandbox.execute("sleep 30", timeout_s=60))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await sandbox.stop()
    with pytest.raises(SandboxError, match="stopped"):
        await running
    assert time.monotonic() - started < 5
    assert not sandbox.host_workspace.exists()


async def test_without_cgroups_timeouts_and_stop_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine with no usable cgroups: processes are found by pid namespace instead."""
    monkeypatch.setattr(sandbox_module, "cgroup_layout", lambda: _none("test: no cgroups"))
    sb = LocalSandbox("nocg", root_dir=tmp_path)
    await sb.start()
    tag = f"1000.{secrets.randbelow(10**6)}"
    try:
        result = await sb.execute(f"cd /tmp; sleep {tag} & (setsid sleep {tag} &); sleep 30", 1)
        assert result.timed_out and result.exit_code == 137
        assert not host_pids_with_arg(tag)
        await sb.execute(f"sleep {tag} &", 10)
        deadline = time.monotonic() + 5  # the background job may not have exec'd yet
        while not host_pids_with_arg(tag) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert host_pids_with_arg(tag)
        assert (await sb.execute("pwd", 10)).output == "/tmp\n"
    finally:
        await sb.stop()
    assert not host_pids_with_arg(tag)
    assert not (tmp_path / "nocg").exists()


def host_pids_with_arg(arg: str) -> list[int]:
    return list(pids_mentioning(arg))


@needs_memory_cgroup
async def test_memory_hog_is_killed_and_sandbox_survives(tmp_path: Path) -> None:
    sb = LocalSandbox("mem", root_dir=tmp_path, memory_mib=100)
    await sb.start()
    try:
        await sb.execute("export KEEP=3", 10)
        hog = await sb.execute(
            'python3 -c \'b = bytearray(400 * 2**20); print("SURV" + "IVED")\'', timeout_s=20
        )
        assert hog.exit_code == 137, hog.output
        assert "SURVIVED" not in hog.output
        after = await sb.execute("echo ok $KEEP", 10)
        assert after.output == "ok 3\n"
        assert (await sb.execute("python3 -c 'print(2 + 2)'", 10)).output == "4\n"
    finally:
        await sb.stop()


@needs_pids_cgroup
async def test_pids_limit_bounds_process_count(tmp_path: Path) -> None:
    sb = LocalSandbox("pids", root_dir=tmp_path, pids=32)
    await sb.start()
    try:
        spawn = textwrap.dedent(
            """\
            import os, subprocess
            children = []
            try:
                for _ in range(100):
                    children.append(subprocess.Popen(["sleep", "100"]))
            except OSError as exc:
                print("fork_failed", exc.errno)
            print("spawned", len(children))
            print("procs", sum(name.isdigit() for name in os.listdir("/proc")))
            """
        )
        await sb.write_file("spawn.py", spawn.encode())
        result = await sb.execute("python3 spawn.py", timeout_s=20)
        lines = dict(line.split(" ", 1) for line in result.output.splitlines())
        assert "fork_failed" in lines, result.output
        assert int(lines["spawned"]) < 32
        assert int(lines["procs"]) <= 32
        assert len(sandbox_pids("pids")) <= 32
        assert (await sb.execute("echo ok", 10)).output == "ok\n"
        await sb.execute("kill -9 -1", 10)  # everything but the shell and init
        assert (await sb.execute("python3 -c 'print(5)'", 10)).output == "5\n"
    finally:
        await sb.stop()


async def test_huge_output_is_truncated_with_marker(sandbox: LocalSandbox) -> None:
    result = await sandbox.execute(
        "echo first; head -c 10000000 /dev/zero | tr '\\0' x; echo; echo last", 30
    )
    assert result.truncated and result.exit_code == 0
    assert result.output.startswith("first\nxxx")
    assert result.output.endswith("xxx\nlast\n")
    assert "output truncated" in result.output and "bytes omitted" in result.output
    assert len(result.output) < 64_000 + 200
    assert (await sandbox.execute("echo ok", 10)).output == "ok\n"


# -- files ------------------------------------------------------------------------------


async def test_file_roundtrip_binary(sandbox: LocalSandbox) -> None:
    small = bytes(range(256)) * 3
    await sandbox.write_file("dir/sub/bin.dat", small)
    assert (sandbox.host_workspace / "dir/sub/bin.dat").read_bytes() == small
    assert await sandbox.read_file("/workspace/dir/sub/bin.dat") == small
    big = secrets.token_bytes(3 * 1024 * 1024 + 7)
    await sandbox.write_file("/tmp/big.bin", big)
    assert await sandbox.read_file("/tmp/big.bin") == big
    await sandbox.write_file("empty", b"")
    assert await sandbox.read_file("empty") == b""
    listing = await sandbox.execute("ls -A /.megaflow/inbox", 10)
    assert listing.output == ""


async def test_file_errors(sandbox: LocalSandbox) -> None:
    with pytest.raises(InvalidRequestError, match=r"missing\.txt"):
        await sandbox.read_file("missing.txt")
    with pytest.raises(InvalidRequestError, match="directory"):
        await sandbox.read_file("/usr")
    with pytest.raises(InvalidRequestError, match="Read-only file system"):
        await sandbox.write_file("/etc/megaflow-x", b"x")
    with pytest.raises(InvalidRequestError, match="Read-only file system"):
        await sandbox.write_file("/usr/new/dir/file", b"x")
    with pytest.raises(InvalidRequestError, match=r"larger|more than"):
        await sandbox.write_file("huge", b"\0" * (8 * 1024 * 1024 + 1))
    with pytest.raises(InvalidRequestError):
        await sandbox.read_file("")
    await sandbox.execute("head -c 9000000 /dev/zero > /workspace/huge", 10)
    with pytest.raises(InvalidRequestError, match="larger"):
        await sandbox.read_file("huge")


async def test_files_follow_the_sandbox_view(sandbox: LocalSandbox) -> None:
    passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    await sandbox.execute("ln -s /etc/passwd x && ln -s /root/secret y", 10)
    with pytest.raises(InvalidRequestError):
        await sandbox.write_file("x", b"owned::0:0::/:/bin/sh\n")
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd
    with pytest.raises(InvalidRequestError):
        await sandbox.write_file("y", b"x")
    assert not Path("/root/secret").exists()
    with pytest.raises(InvalidRequestError):
        await sandbox.read_file("../../etc/shadow")
    with pytest.raises(InvalidRequestError):
        await sandbox.read_file("/root/.bashrc")


# -- lifecycle ----------------------------------------------------------------------------


async def test_stop_leaves_nothing(tmp_path: Path) -> None:
    mounts = Path("/proc/self/mounts").read_text()
    sb = LocalSandbox("gone", root_dir=tmp_path)
    await sb.start()
    await sb.execute("sleep 1000 & (setsid sleep 1001 &) ; echo x > /tmp/x", 10)
    pids = sandbox_pids("gone")
    cgroups = owner_cgroups(sb)
    assert len(pids) >= 4  # outer bwrap, init, shell, the sleeps
    assert cgroups == [] or all(p.is_dir() for p in cgroups)
    await sb.stop()
    assert not sb.alive
    # Not even a zombie: every process was reaped (init dies first, so the outer bwrap
    # reaps it instead of leaving it to the host's init).
    left = {pid: state for pid in pids if (state := _state(pid)) != "gone"}
    assert left == {}
    assert not any(p.exists() for p in cgroups)
    assert not (tmp_path / "gone").exists()
    assert Path("/proc/self/mounts").read_text() == mounts
    await sb.stop()
    with pytest.raises(SandboxError):
        await sb.execute("echo", 1)


async def test_start_twice_and_duplicate_id(tmp_path: Path) -> None:
    sb = LocalSandbox("dup", root_dir=tmp_path)
    await sb.start()
    try:
        with pytest.raises(SandboxError):
            await sb.start()
        other = LocalSandbox("dup", root_dir=tmp_path)
        with pytest.raises(SandboxError, match="already exists"):
            await other.start()
        assert (await sb.execute("echo still", 10)).output == "still\n"
    finally:
        await sb.stop()


async def test_start_failure_is_sandbox_error_and_cleans_up(tmp_path: Path) -> None:
    image = tmp_path / "image"  # an image root whose bash cannot run
    (image / "usr/bin").mkdir(parents=True)
    (image / "usr/bin/bash").write_text("not a program")
    (image / "usr/bin/bash").chmod(0o755)
    sb = LocalSandbox("bad", root_dir=tmp_path / "root", image_root=image)
    with pytest.raises(SandboxError, match="did not start"):
        await sb.start()
    assert not (tmp_path / "root" / "bad").exists()
    assert not sandbox_pids("bad")


async def test_sandboxes_are_isolated_from_each_other(tmp_path: Path) -> None:
    a, b = LocalSandbox("a", root_dir=tmp_path), LocalSandbox("b", root_dir=tmp_path)
    await asyncio.gather(a.start(), b.start())
    try:
        await a.execute("echo secret > /workspace/s; sleep 1000 &", 10)
        seen = await b.execute("ls /workspace; cat /proc/[0-9]*/comm", 10)
        assert "s\n" not in seen.output and "sleep" not in seen.output
        results = await asyncio.gather(*(x.execute("echo $$", 10) for x in (a, b, a)))
        assert [r.output for r in results] == ["2\n", "2\n", "2\n"]
    finally:
        await asyncio.gather(a.stop(), b.stop())


CRASHER = """
import asyncio, os, sys
from pathlib import Path
from megaflow.env.local import LocalSandbox

async def main():
    sb = LocalSandbox("orphan", root_dir=Path(sys.argv[1]))
    await sb.start()
    await sb.execute("sleep 1000 &", 10)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_reclaim_orphans_after_a_crash(tmp_path: Path) -> None:
    crasher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, str(tmp_path), stdout=subprocess.PIPE
    )
    assert crasher.stdout is not None
    assert await asyncio.wait_for(crasher.stdout.readline(), 20) == b"ready\n"
    live = LocalSandbox("live", root_dir=tmp_path)
    await live.start()
    try:
        cgroups = [
            Path(p) for p in json.loads((tmp_path / "orphan/owner.json").read_text())["cgroups"]
        ]
        assert reclaim_orphans(tmp_path) == 0  # the owner is still alive
        crasher.send_signal(signal.SIGKILL)
        await crasher.wait()
        assert reclaim_orphans(tmp_path) == 1
        assert not (tmp_path / "orphan").exists()
        assert not any(p.exists() for p in cgroups)
        deadline = time.monotonic() + 5
        while sandbox_pids("orphan") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not sandbox_pids("orphan")
        assert (tmp_path / "live").exists() and live.alive
        assert (await live.execute("echo alive", 10)).output == "alive\n"
    finally:
        await live.stop()


# -- the wire protocol (pure) -----------------------------------------------------------


def test_ansi_c_quote_is_one_line() -> None:
    quoted = ansi_c_quote("a'b\\c\nd é")
    assert "\n" not in quoted
    assert quoted == "$'a\\x27b\\x5cc\\x0ad \\xc3\\xa9'"


def test_output_collector_keeps_head_and_tail() -> None:
    sink = OutputCollector(10)
    for chunk in (b"0123", b"456789", b"abcdefghij" * 1000, b"XYZ"):
        sink.add(chunk)
    assert sink.truncated
    assert sink.text() == (
        "01234\n[... megaflow: output truncated, 10003 bytes omitted ...]\nijXYZ"
    )
    small = OutputCollector(10)
    small.add(b"abc")
    assert (small.text(), small.truncated) == ("abc", False)
