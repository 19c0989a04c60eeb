"""DockerSandbox (runc) against a real private dockerd: shell, limits, files (no mocks)."""

from __future__ import annotations

import asyncio
import os
import re
import socket

import pytest

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.docker import DockerEngine, DockerSandbox
from megaflow.env.docker.hardening import DiskQuota
from megaflow.env.docker.sandbox import MAX_FILE_BYTES
from megaflow.env.shell import TRUNCATION_MARKER
from tests.env.docker.conftest import Factory

pytestmark = pytest.mark.integration

COUNT_PROCS = "n=0; for d in /proc/[0-9]*; do n=$((n+1)); done; echo count=$n."
"""Counts the container's processes with builtins only (works at the pids limit)."""


def counted(output: str) -> int:
    """The figure COUNT_PROCS printed (other processes may write around it)."""
    found = re.findall(r"count=(\d+)\.", output)
    assert found, output
    return int(found[-1])


async def test_shell_state_persists_across_commands(sandbox: DockerSandbox) -> None:
    r = await sandbox.execute("mkdir -p /tmp/d && cd /tmp/d && export GREETING='it''s me'", 10)
    assert r.exit_code == 0 and not r.timed_out
    r = await sandbox.execute('echo "$GREETING"; pwd', 10)
    assert r.output == "its me\n/tmp/d\n"
    assert await sandbox.cwd() == "/tmp/d"
    r = await sandbox.execute("f() { return 7; }; f", 10)
    assert r.exit_code == 7
    r = await sandbox.execute("if", 10)  # a syntax error does not end the shell
    assert r.exit_code != 0 and "syntax error" in r.output
    assert (await sandbox.execute("echo still; echo err >&2", 10)).output == "still\nerr\n"


async def test_timeout_kills_the_command_and_keeps_the_shell(sandbox: DockerSandbox) -> None:
    await sandbox.execute("export KEEP=1; cd /tmp", 10)
    r = await sandbox.execute("echo started; sleep 30", 1)
    assert r.timed_out and r.exit_code == 137
    assert "started" in r.output and "timed out after 1 s" in r.output
    r = await sandbox.execute("echo $KEEP; pwd; ps -o args | grep -c '^sleep 30'", 10)
    assert r.output.split() == ["1", "/tmp", "0"]  # the sleep is gone


async def test_builtin_loop_timeout_replaces_the_shell(sandbox: DockerSandbox) -> None:
    await sandbox.write_file("kept.txt", b"kept")
    r = await sandbox.execute("while :; do :; done", 1)
    assert r.timed_out and r.exit_code == 137
    assert "a new shell was started" in r.output
    r = await sandbox.execute("cat kept.txt", 10)
    assert (r.exit_code, r.output) == (0, "kept")
    assert sandbox.alive


async def test_cancelled_command_is_killed_and_the_shell_resyncs(sandbox: DockerSandbox) -> None:
    await sandbox.execute("export KEEP=2", 10)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sandbox.execute("sleep 30; echo late", 60), 0.5)
    r = await sandbox.execute("echo $KEEP", 10)
    assert (r.exit_code, r.output) == (0, "2\n")


async def test_large_files_travel_intact(sandbox: DockerSandbox) -> None:
    blob = os.urandom(MAX_FILE_BYTES)
    await sandbox.write_file("big.bin", blob)
    assert (await sandbox.execute("wc -c < big.bin", 30)).output.strip() == str(len(blob))
    assert await sandbox.read_file("big.bin") == blob
    await sandbox.write_file("too_big.bin", b"")
    with pytest.raises(InvalidRequestError):
        await sandbox.write_file("too_big.bin", blob + b"x")


async def test_exit_restarts_the_shell(sandbox: DockerSandbox) -> None:
    r = await sandbox.execute("exit 3", 10)
    assert r.exit_code == 3 and "a new shell was started" in r.output
    assert (await sandbox.execute("echo back", 10)).output == "back\n"


async def test_memory_limit_kills_the_hog_and_the_sandbox_survives(
    make_sandbox: Factory,
) -> None:
    # The container holds memory_mib plus the tmpfs quotas (files have their own room).
    quota = DiskQuota(workspace_mib=16, tmp_mib=16)
    sb: DockerSandbox = await make_sandbox(memory_mib=64, quota=quota)
    hog = "sh -c 'x=$(head -c 300000000 /dev/zero | tr \"\\0\" a); echo ${#x}'"
    r = await sb.execute(hog, 60)
    assert r.exit_code == 137 and "300000000" not in r.output
    assert (await sb.execute("echo alive", 10)).output == "alive\n"


async def test_no_network(sandbox: DockerSandbox) -> None:
    r = await sandbox.execute("cat /proc/net/dev", 10)
    interfaces = [line.split(":")[0].strip() for line in r.output.splitlines() if ":" in line]
    assert interfaces == ["lo"]
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        r = await sandbox.execute(f"echo hi | nc -w 2 127.0.0.1 {port}; echo status=$?", 10)
        assert "status=0" not in r.output
        with pytest.raises(TimeoutError):
            server.accept()


async def test_pids_limit_holds_and_the_shell_recovers(make_sandbox: Factory) -> None:
    sb: DockerSandbox = await make_sandbox(pids=24)
    r = await sb.execute("i=0; while [ $i -lt 60 ]; do sleep 30 & i=$((i+1)); done", 10)
    assert r.exit_code != 0 and "fork" in r.output
    count = counted((await sb.execute(COUNT_PROCS, 10)).output)
    assert 10 < count <= 24
    await sb.execute("exit", 10)  # a new shell: every leftover process is killed
    r = await sb.execute(f"sleep 0.1 && {COUNT_PROCS}", 10)
    assert r.exit_code == 0 and counted(r.output) <= 4


async def test_fork_bomb_is_contained(make_sandbox: Factory) -> None:
    sb: DockerSandbox = await make_sandbox(pids=32)
    await sb.write_file("kept.txt", b"kept")
    await sb.execute("b() { b | b & }; b", 10)
    r = await sb.execute(COUNT_PROCS, 10)  # builtins only: no fork needed
    assert counted(r.output) <= 32
    r = await sb.execute("while :; do :; done", 2)  # the timeout clears the sandbox
    assert r.timed_out and r.exit_code == 137
    r = await sb.execute(f"cat kept.txt; echo; sleep 0.1 && {COUNT_PROCS}", 20)
    assert r.exit_code == 0 and r.output.startswith("kept\n") and counted(r.output) <= 4


async def test_output_is_truncated_with_a_marker(make_sandbox: Factory) -> None:
    sb: DockerSandbox = await make_sandbox(output_bytes=1000)
    r = await sb.execute("echo BEGIN; yes | head -c 200000; echo; echo END", 20)
    assert r.truncated and r.exit_code == 0
    assert r.output.startswith("BEGIN\n") and r.output.endswith("END\n")
    omitted = TRUNCATION_MARKER.split("{")[0]
    assert omitted in r.output and len(r.output) < 1200
    assert not (await sb.execute("echo short", 10)).truncated


async def test_files_round_trip_inside_the_container(sandbox: DockerSandbox) -> None:
    blob = bytes(range(256)) * 1000
    await sandbox.write_file("deep/dir/blob.bin", blob)
    assert await sandbox.read_file("/workspace/deep/dir/blob.bin") == blob
    await sandbox.put_files({"pkg/mod.py": b"X = 1\n", "README": b"hello"})
    r = await sandbox.execute("cat pkg/mod.py README", 10)
    assert r.output == "X = 1\nhello"
    await sandbox.execute("ln -s /etc/passwd link", 10)
    assert (await sandbox.read_file("link")).startswith(b"root:")  # resolved in the container
    with pytest.raises(InvalidRequestError, match="no such file"):
        await sandbox.read_file("missing.txt")
    with pytest.raises(InvalidRequestError, match="is a directory"):
        await sandbox.read_file("deep")
    with pytest.raises(InvalidRequestError, match="inside the workdir"):
        await sandbox.put_files({"../escape": b"x"})


async def test_bad_input_is_rejected(engine: DockerEngine, sandbox: DockerSandbox) -> None:
    with pytest.raises(InvalidRequestError):
        DockerSandbox("bad id!", engine=engine, image="x")
    with pytest.raises(InvalidRequestError):
        DockerSandbox("ok", engine=engine, image="x", pids=1)
    with pytest.raises(InvalidRequestError):
        await sandbox.execute("   ", 10)
    with pytest.raises(InvalidRequestError):
        await sandbox.execute("echo", -1)
    with pytest.raises(InvalidRequestError):
        await sandbox.restore(b"not a tar archive")


async def test_missing_image_is_a_sandbox_error_naming_it(engine: DockerEngine) -> None:
    sb = DockerSandbox("noimg", engine=engine, image="megaflow-missing:nope")
    with pytest.raises(SandboxError, match="megaflow-missing:nope"):
        await sb.start()
    assert not sb.alive
    await sb.stop()


async def test_root_refused_on_runc_without_userns(make_sandbox: Factory) -> None:
    with pytest.raises(InvalidRequestError, match="isolating runtime"):
        await make_sandbox(user="root")


async def test_non_root_by_default_with_quotas(make_sandbox: Factory) -> None:
    sb: DockerSandbox = await make_sandbox(quota=DiskQuota(workspace_mib=4, tmp_mib=2))
    r = await sb.execute(
        "id -u; dd if=/dev/zero of=big bs=1M count=8 2>&1 | head -1; "
        "dd if=/dev/zero of=/tmp/big bs=1M count=8 2>&1 | head -1",
        20,
    )
    lines = r.output.splitlines()
    assert lines[0] == "1000", r.output
    assert all("No space left on device" in line for line in lines[1:3]), r.output
    archive = await sb.snapshot()  # snapshots read the quota mount
    assert archive
