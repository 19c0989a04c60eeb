"""A private ``redis-server`` for tests and benchmarks, durable like production.

    with RedisServer() as server:           # ready in ~50 ms
        ledger = RedisLedger(server.url)
        ...
        server.kill()                        # SIGKILL: a crash
        server.restart()                     # same port, same data: replays the AOF

:class:`RedisServer` installs nothing (``./dev`` installs Debian ``redis-server``). It
runs one server on a free loopback port with its data folder in a temporary folder,
``appendonly yes`` and ``appendfsync always`` (a write is acknowledged only once it is
fsynced), no RDB snapshots; :meth:`stop` ends it by PID (SIGTERM, then SIGKILL) and
deletes the folder.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from megaflow.testing.server import LocalServer, free_port

REDIS_SERVER = "redis-server"


def redis_available() -> str | None:
    """None if a private redis-server can run here, else why not."""
    if shutil.which(REDIS_SERVER) is None:
        return "redis-server is not installed (Debian package redis-server; ./dev installs it)"
    return None


class RedisServer(LocalServer):
    """One private redis-server; ``url`` is ``redis://127.0.0.1:<port>/0``."""

    name = "redis"

    def __init__(self, parent: Path | None = None) -> None:
        super().__init__(parent)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
