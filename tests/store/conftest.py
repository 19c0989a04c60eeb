"""Backends for the store contract suite: sqlite (a file), redis and etcd (real servers)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megaflow.store.factory import open_ledger
from megaflow.store.ledger import TaskLedger
from megaflow.testing.etcd_server import EtcdServer, etcd_available
from megaflow.testing.redis_server import RedisServer, redis_available


@dataclass
class Backend:
    """One store: ``url`` for `open_ledger`; ``crash`` SIGKILLs and restarts its server."""

    name: str
    url: str
    server: RedisServer | EtcdServer | None = None
    opened: list[TaskLedger] = field(default_factory=list)

    async def ledger(self) -> TaskLedger:
        """A new, opened ledger on this store (closed by the fixture if left open)."""
        ledger = open_ledger(self.url)
        await ledger.open()
        self.opened.append(ledger)
        return ledger

    def crash(self) -> None:
        """kill -9 of the server process, then a restart on the same data."""
        if self.server is not None:
            self.server.kill()
            self.server.restart()


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.integration),
    pytest.param("etcd", id="etcd", marks=pytest.mark.integration),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name = request.param
    server: RedisServer | EtcdServer | None = None
    if name == "sqlite":
        found = Backend(name, f"sqlite://{tmp_path / 'ledger.sqlite'}")
    elif name == "redis":
        if (why := redis_available()) is not None:
            pytest.skip(why)
        server = RedisServer().start()
        found = Backend(name, server.url, server)
    else:
        if (why := etcd_available()) is not None:
            pytest.skip(why)
        server = EtcdServer().start()
        found = Backend(name, server.url, server)
    try:
        yield found
    finally:
        for ledger in found.opened:
            with contextlib.suppress(Exception):  # a crashed server's client may fail
                await ledger.close()
        if server is not None:
            server.stop()
