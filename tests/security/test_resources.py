"""Resource exhaustion: fork and memory bombs, disk fill, output floods and garbage.
Each is bounded by the sandbox (pids and memory cgroups, output cap, step timeout,
workspace quota where requested); the host, the victim and the service carry on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from megaflow.v1 import common_pb2, env_pb2
from tests.security.backends import sandbox_containers
from tests.security.conftest import OUTPUT_BYTES, PIDS, TMP_MIB, Arena, failed

pytestmark = pytest.mark.integration

MARKER_TEXT = "output truncated"
HOST_FREE_FLOOR = 1024**3
"""The host must keep at least this much free disk after a sandbox's fill attempt."""


async def _assert_recovered(arena: Arena) -> None:
    """Only init, the shell and the probe remain, at the latest after two more timed-out
    steps: a timeout's kill sweep can miss children a bomb forks during the sweep (rare,
    under load); each further sweep catches them."""
    counts = []
    for _ in range(3):
        r = await arena.step("/usr/bin/ps -e --no-headers | wc -l")
        assert r.exit_code == 0, r.output
        counts.append(int(r.output.split()[-1]))
        if counts[-1] <= 5:  # init, shell, ps, wc (and a pipe)
            return
        assert failed(await arena.step("sleep 30", timeout_s=2.0))
    raise AssertionError(f"the bomb survives timeouts: process counts {counts}")


async def test_fork_bomb_foreground(arena: Arena) -> None:
    r = await arena.step(arena.bash("bomb() { bomb | bomb; }; bomb"), timeout_s=5.0)
    assert failed(r)
    assert r.timed_out or "fork" in r.output or "Resource temporarily unavailable" in r.output
    await _assert_recovered(arena)
    await arena.assert_contained()


async def test_fork_bomb_background(arena: Arena) -> None:
    r = await arena.step(":(){ :|:& };:", timeout_s=5.0)
    assert not r.timed_out  # the bomb detaches at once
    probe = await arena.step("sleep 30", timeout_s=3.0)  # the timeout kills the workload
    assert failed(probe)
    await _assert_recovered(arena)
    await arena.assert_contained()


@pytest.mark.hole_on(
    "gvisor",
    reason="gVisor's guest threads are goroutines of its Sentry, not host tasks: the pids "
    "cgroup does not count them and 1000 threads start (this runsc has no guest pids limit)",
)
async def test_pids_limit_counts_threads(arena: Arena) -> None:
    r = await arena.step(
        "python3 -c 'import threading,time\n"
        "n=0\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n+=1\n"
        "except RuntimeError:\n"
        '    print("stopped at", n); raise SystemExit(1)\'',
    )
    assert failed(r)
    assert int(r.output.split("stopped at")[-1].split()[0]) < PIDS, r.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'",
        "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo ${#x}",
    ],
    ids=["python_bytearray", "in_the_shell_itself"],
)
@pytest.mark.hole_on(
    "gvisor",
    reason="the container's memory cgroup holds gVisor's Sentry too: a bomb takes the whole "
    "sandbox (the step hangs to its timeout, then a restarted sandbox), not the bomb alone",
)
async def test_memory_bomb_is_killed(arena: Arena, command: str) -> None:
    r = await arena.step(command, timeout_s=30.0)
    assert r.exit_code == 137 and not r.timed_out, r.output
    await arena.assert_contained()


def _host_copies(arena: Arena, path: str) -> list[Path]:
    """Where the attacker's ``path`` lies on the host: its local workspace folder, or
    (Docker) its container's private upper layer."""
    if arena.dockerd is None:
        return list(arena.service.config.root_dir.glob(f"*/workspace/{Path(path).name}"))
    uppers = [
        Path(c["GraphDriver"]["Data"]["UpperDir"])
        for c in sandbox_containers(arena.dockerd)
        if c["Id"] == arena.containers["attacker"]
    ]
    return [u / path.lstrip("/") for u in uppers if (u / path.lstrip("/")).exists()]


async def test_fill_private_tmp(arena: Arena) -> None:
    if arena.backend == "local":
        r = await arena.step("head -c 200000000 /dev/zero > /tmp/fill", timeout_s=30.0)
        assert failed(r)  # tmpfs pages count against the memory limit: killed or ENOSPC
        await arena.assert_contained()
        return
    # Docker, gVisor: /tmp is a tmpfs with the backend's default quota (32 MiB here).
    r = await arena.step(
        "head -c 200000000 /dev/zero > /tmp/fill; du -m /tmp/fill | cut -f1", timeout_s=30.0
    )
    # busybox head words ENOSPC on its stdout as "I/O error"
    assert "No space left on device" in r.output or "I/O error" in r.output, r.output
    assert int(r.output.split()[-1]) <= TMP_MIB, r.output
    await arena.assert_contained()


async def test_fill_workspace_without_quota(arena: Arena) -> None:
    if arena.backend == "local":  # a quota applies by default (half the memory limit)
        r = await arena.step("head -c 200000000 /dev/zero > fill", timeout_s=30.0)
        assert failed(r) and "No space left on device" in r.output, r.output
        await arena.assert_contained()
        return
    # No quota requested: the write is bounded by the command; the host keeps its space
    # and the space comes back at release. Docker, gVisor: the default quota applies.
    r = await arena.step("head -c 200000000 /dev/zero > fill; stat -c %s fill", timeout_s=30.0)
    if arena.docker:
        assert "No space left on device" in r.output or "I/O error" in r.output, r.output
        assert r.output.split()[-1] != "200000000", r.output
        await arena.assert_contained()
        return
    await _assert_fill_bounded_and_freed(arena, r, "/workspace/fill")


async def _assert_fill_bounded_and_freed(
    arena: Arena, r: env_pb2.ExecuteStepResponse, path: str
) -> None:
    assert r.exit_code == 0 and r.output.split()[-1] == "200000000", r.output
    fills = _host_copies(arena, path)
    assert len(fills) == 1, fills
    assert shutil.disk_usage(fills[0]).free > HOST_FREE_FLOOR
    await arena.service.release_environment(
        env_pb2.ReleaseEnvironmentRequest(env_id=arena.attacker)
    )
    assert not fills[0].exists()
    arena.attacker = (await arena.service.create_environment(arena.request(owner="again"))).env_id
    await arena.assert_contained()


@pytest.mark.skipif(
    "disk_mib" not in common_pb2.EnvLimits.DESCRIPTOR.fields_by_name,
    reason="no workspace quota in this contract",
)
async def test_fill_workspace_with_quota(arena: Arena) -> None:
    limits = common_pb2.EnvLimits(disk_mib=32)
    arena.attacker = (
        await arena.service.create_environment(arena.request(owner="quota", limits=limits))
    ).env_id
    r = await arena.step("head -c 200000000 /dev/zero > fill", timeout_s=30.0)
    assert failed(r)
    # busybox head (Docker's image) words ENOSPC on its stdout as "I/O error"
    enospc = ("No space left on device", "I/O error") if arena.docker else ("No space left",)
    assert any(x in r.output for x in enospc), r.output
    write = await arena.write("more", b"x" * (1024 * 1024))
    assert not write.ok and "space" in write.message.lower(), write.message
    await arena.step("rm -f fill")
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "head -c 100000000 /dev/zero | tr '\\0' a; (exit 7)",
        "seq 1 20000000; (exit 7)",
        "yes pwned | head -c 100000000; (exit 7)",
    ],
    ids=["one_100mb_line", "20m_lines", "yes"],
)
async def test_huge_output_is_truncated(arena: Arena, command: str) -> None:
    r = await arena.step(command, timeout_s=60.0)
    assert r.exit_code == 7 and r.truncated and not r.timed_out
    assert MARKER_TEXT in r.output
    omitted = re.search(r"(\d+) bytes omitted", r.output)
    assert omitted and int(omitted.group(1)) >= 90_000_000, r.output[-300:]  # all of it read
    assert len(r.output.encode()) <= OUTPUT_BYTES + 200
    await arena.assert_contained()


async def test_binary_garbage_output(arena: Arena) -> None:
    r = await arena.step(
        "printf 'abc\\xff\\xfe\\x00\\x80\\xc3(def'; head -c 2000000 /dev/urandom; (exit 9)"
    )
    assert r.exit_code == 9 and r.truncated
    assert r.output.startswith("abc\ufffd\ufffd\x00\ufffd\ufffd(def")
    assert r.output.encode("utf-8")  # a valid string, whatever the bytes were
    await arena.assert_contained()


async def test_long_line_without_newline(arena: Arena) -> None:
    r = await arena.step("head -c 5000000 /dev/zero | tr '\\0' x; (exit 8)")
    assert r.exit_code == 8 and r.truncated
    assert r.output.rstrip("x").endswith("omitted ...]\n")
    await arena.assert_contained()


async def test_output_flood_until_timeout(arena: Arena) -> None:
    r = await arena.step("yes flood", timeout_s=2.0)
    assert r.timed_out and r.exit_code == 137 and r.truncated
    assert len(r.output.encode()) <= OUTPUT_BYTES + 400
    await arena.assert_contained()
