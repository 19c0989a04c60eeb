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

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

REDIS_SERVER = "redis-server"


def redis_available() -> str | None:
    """None if a private redis-server can run here, else why not."""
    if shutil.which(REDIS_SERVER) is None:
        return "redis-server is not installed (Debian package redis-server; ./dev installs it)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One private redis-server; ``url`` is ``redis://127.0.0.1:<port>/0``."""

    def __init__(self, parent: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mf-redis-", dir=parent or "/tmp"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 30.0) -> RedisServer:
        """Spawn the server and wait (at most ``timeout_s``) until it answers PING."""
        argv = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while not self._ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._end(grace_s=2.0)
                raise RuntimeError(f"redis-server did not become ready:\n{self.log()[-4000:]}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL the server (a crash); its data folder stays."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def restart(self, timeout_s: float = 30.0) -> RedisServer:
        """Start again on the same port and data folder (after :meth:`kill` or a crash)."""
        self._end()
        return self.start(timeout_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """End the server by PID (SIGTERM, then SIGKILL) and delete its folder."""
        self._end(grace_s)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def _end(self, grace_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
