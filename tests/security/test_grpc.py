"""The same hostile actions over the wire: GrpcServer + EnvironmentServiceClient on
loopback. Containment does not depend on the transport, and errors cross it cleanly."""

from __future__ import annotations

import pytest

from megaflow.core.errors import MegaFlowError
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import MAX_MESSAGE_BYTES
from megaflow.v1 import env_pb2
from tests.security.conftest import OUTPUT_BYTES, Arena, failed

pytestmark = pytest.mark.integration


async def test_grpc_read_host_secret(grpc_arena: Arena) -> None:
    arena = grpc_arena
    assert isinstance(arena.api, EnvironmentServiceClient)
    r = await arena.step(f"cat {arena.secret_file} {arena.root_secret}")
    assert failed(r) and arena.secret.decode() not in r.output
    read = await arena.read(f"../../..{arena.root_secret}")
    assert not read.ok and "no such file" in read.message
    await arena.assert_contained()


async def test_grpc_write_host_files(grpc_arena: Arena) -> None:
    arena = grpc_arena
    r = await arena.write("../../etc/passwd", b"evil::0:0::/:/bin/sh\n")
    # local: the image is bound read-only; Docker: the sandbox user may not write there.
    denial = "permission denied" if arena.docker else "read-only"
    assert not r.ok and denial in r.message.lower(), r.message
    r = await arena.write(f"/root/{arena.pwn}", b"pwned")
    assert not r.ok
    step = await arena.step(f"echo pwned > /usr/bin/{arena.pwn}")
    assert failed(step)
    await arena.assert_contained()


async def test_grpc_signal_victim_and_reach_host_listener(grpc_arena: Arena) -> None:
    arena = grpc_arena
    r = await arena.step(f"kill -9 {arena.victim.daemon_pid}")
    assert failed(r)
    r = await arena.step(arena.bash(f"echo pwned > /dev/tcp/127.0.0.1/{arena.listener_port}"))
    assert failed(r) and "refused" in r.output.lower()
    await arena.assert_contained()


@pytest.mark.hole_on(
    "gvisor",
    reason="a memory bomb exhausts the container's cgroup, which holds gVisor's Sentry too: "
    "the step hangs to its timeout and the sandbox restarts (empty /workspace) instead of "
    "the bomb alone being killed",
)
async def test_grpc_memory_bomb_and_timeout(grpc_arena: Arena) -> None:
    arena = grpc_arena
    r = await arena.step("python3 -c 'b = bytearray(400 * 1024 * 1024)'", timeout_s=30.0)
    assert r.exit_code == 137 and not r.timed_out
    r = await arena.step("trap '' TERM; sleep 60", timeout_s=1.0)
    assert r.timed_out and r.exit_code == 137
    await arena.assert_contained()


async def test_grpc_huge_output_and_garbage(grpc_arena: Arena) -> None:
    arena = grpc_arena
    r = await arena.step("head -c 100000000 /dev/urandom; (exit 7)", timeout_s=60.0)
    assert r.exit_code == 7 and r.truncated
    assert len(r.output.encode()) <= 2 * OUTPUT_BYTES  # U+FFFD takes 3 bytes for 1
    await arena.assert_contained()


async def test_grpc_ten_megabyte_edit(grpc_arena: Arena) -> None:
    arena = grpc_arena
    assert (await arena.write("small.txt", b"hello\n")).ok
    big = "x" * (10 * 1024 * 1024)
    r = await arena.act(edit_file=env_pb2.EditFile(path="small.txt", old="hello", new=big))
    assert not r.ok and "more than" in r.message, r.message
    assert (await arena.read("small.txt")).content == b"hello\n"
    await arena.assert_contained()


async def test_grpc_request_over_the_message_limit(grpc_arena: Arena) -> None:
    arena = grpc_arena
    huge = b"x" * (MAX_MESSAGE_BYTES + 1024)
    with pytest.raises(MegaFlowError):  # refused by the transport: a typed error, no hang
        await arena.write("huge.bin", huge)
    r = await arena.step("ls huge.bin")
    assert failed(r)
    await arena.assert_contained()
