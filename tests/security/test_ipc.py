"""Hostile inter-process communication: the host's abstract and filesystem unix
sockets, its SysV shared memory, another sandbox's abstract socket; and malformed
ExecuteStep requests (NUL bytes, oversized commands, bad timeouts)."""

from __future__ import annotations

import ctypes
import secrets
import socket

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import env_pb2
from tests.security import hoststate
from tests.security.conftest import Arena, failed

pytestmark = pytest.mark.integration

CONNECT_UNIX = (
    "python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); "
    's.connect(sys.argv[1].replace("@", "\\0")); print("connected")\' {address}'
)


async def test_reach_host_abstract_unix_socket(arena: Arena) -> None:
    name = f"@megaflow-{arena.marker}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(name.replace("@", "\0"))
    server.listen()
    try:
        r = await arena.step(CONNECT_UNIX.format(address=name))
        assert failed(r) and "Connection refused" in r.output, r.output
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    await arena.assert_contained()


async def test_reach_host_filesystem_unix_socket(arena: Arena) -> None:
    path = arena.host_dir / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    try:
        r = await arena.step(CONNECT_UNIX.format(address=path) + "; ls /run /var/run")
        assert failed(r) and "No such file or directory" in r.output, r.output
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    await arena.assert_contained()


async def test_reach_victim_abstract_unix_socket(arena: Arena) -> None:
    name = f"@victim-sock-{arena.marker}"
    serve = (
        "nohup python3 -c 'import socket,sys,time; s=socket.socket(socket.AF_UNIX); "
        's.bind(sys.argv[1].replace("@", "\\0")); s.listen(); time.sleep(60)\' '
        f"{name} >/dev/null 2>&1 & sleep 0.5; " + CONNECT_UNIX.format(address=name)
    )
    r = await arena.step(serve, env_id=arena.victim.env_id)
    assert r.exit_code == 0 and "connected" in r.output, r.output
    attack = await arena.step(CONNECT_UNIX.format(address=name))
    assert failed(attack) and "Connection refused" in attack.output, attack.output
    await arena.assert_contained()


@pytest.mark.skipif(not hoststate.X86_64, reason="ctypes SysV calls checked on x86_64 only")
async def test_attach_host_sysv_shared_memory(arena: Arena) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    key = secrets.randbelow(2**30) + 1
    shm_id = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT | rw for all
    assert shm_id >= 0
    try:
        r = await arena.step(
            "ipcs -m; python3 -c 'import ctypes,sys; "
            f"sys.exit(ctypes.CDLL(None).shmget({key}, 0, 0) < 0)'"
        )
        assert failed(r), r.output
        assert f"{key:#010x}" not in r.output
    finally:
        libc.shmctl(shm_id, 0, None)  # IPC_RMID
    await arena.assert_contained()


@pytest.mark.parametrize(
    ("command", "timeout_s", "message"),
    [
        ("echo a\x00; cat /etc/shadow", 5.0, "NUL"),
        ("echo " + "x" * (2 * 1024 * 1024), 5.0, "longer than"),
        ("echo ok", -1.0, "timeout"),
        ("echo ok", 1e9, "exceeds"),
        ("   ", 5.0, "empty"),
    ],
    ids=["nul_byte", "two_megabyte_command", "negative_timeout", "huge_timeout", "blank"],
)
async def test_malformed_step_requests(
    arena: Arena, command: str, timeout_s: float, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        await arena.service.execute_step(
            env_pb2.ExecuteStepRequest(env_id=arena.attacker, command=command, timeout_s=timeout_s)
        )
    await arena.assert_contained()
