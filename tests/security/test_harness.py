"""The containment checks themselves notice a breach: each change is made here from
the host side (what a successful escape would do) and `assert_contained` must fail."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.security import hoststate
from tests.security.conftest import Arena

pytestmark = pytest.mark.integration


async def test_notices_a_planted_host_file(arena: Arena) -> None:
    planted = Path("/root") / arena.pwn
    planted.write_text("pwned")
    try:
        with pytest.raises(AssertionError, match="appeared on the host"):
            await arena.assert_contained()
    finally:
        planted.unlink()
    await arena.assert_contained()


async def test_notices_a_changed_secret(arena: Arena) -> None:
    arena.secret_file.write_bytes(b"overwritten")
    with pytest.raises(AssertionError, match="was changed"):
        await arena.assert_contained()
    arena.secret_file.write_bytes(arena.secret)
    await arena.assert_contained()


async def test_notices_a_listener_connection(arena: Arena) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", arena.listener_port)
    writer.close()
    for _ in range(100):
        if arena.connections:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(AssertionError, match="listener was reached"):
        await arena.assert_contained()


async def test_notices_a_killed_victim(arena: Arena) -> None:
    os.kill(arena.victim.daemon_pid, signal.SIGKILL)
    for _ in range(200):
        if hoststate.start_ticks(arena.victim.daemon_pid) is None:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(AssertionError, match="victim killed"):
        await arena.assert_contained()
