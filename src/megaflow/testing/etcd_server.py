"""A private single-member ``etcd`` for tests and benchmarks.

    with EtcdServer() as server:            # ready in well under a second
        ledger = EtcdLedger(server.url)
        ...
        server.kill()                        # SIGKILL: a crash
        server.restart()                     # same ports, same data folder

:class:`EtcdServer` installs nothing (``./dev`` installs Debian ``etcd-server``). It
runs one member on free loopback ports (client and peer) with its data folder in a
temporary folder; etcd fsyncs its raft log before it answers a write, so what was
acknowledged survives a kill -9. :meth:`stop` ends it by PID (SIGTERM, then SIGKILL)
and deletes the folder.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from megaflow.testing.redis_server import free_port

ETCD = "etcd"


def etcd_available() -> str | None:
    """None if a private etcd can run here, else why not."""
    if shutil.which(ETCD) is None:
        return "etcd is not installed (Debian package etcd-server; ./dev installs it)"
    return None


class EtcdServer:
    """One private etcd member; ``url`` is ``etcd://127.0.0.1:<client port>``."""

    def __init__(self, parent: Path | None = None, max_request_bytes: int | None = None) -> None:
        """``max_request_bytes``: etcd's request-size limit (default: etcd's, 1.5 MiB)."""
        self.dir = Path(tempfile.mkdtemp(prefix="mf-etcd-", dir=parent or "/tmp"))
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"etcd://127.0.0.1:{self.port}"
        self.max_request_bytes = max_request_bytes
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 30.0) -> EtcdServer:
        """Spawn etcd and wait (at most ``timeout_s``) until ``/health`` says true."""
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD,
            "--name", "megaflow",
            "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"megaflow={peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.max_request_bytes is not None:
            argv += ["--max-request-bytes", str(self.max_request_bytes)]
        log = (self.dir / "etcd.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._end(grace_s=2.0)
                raise RuntimeError(f"etcd did not become ready:\n{self.log()[-4000:]}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL etcd (a crash); its data folder stays."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def restart(self, timeout_s: float = 30.0) -> EtcdServer:
        """Start again on the same ports and data folder (after :meth:`kill` or a crash)."""
        self._end()
        return self.start(timeout_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """End etcd by PID (SIGTERM, then SIGKILL) and delete its folder."""
        self._end(grace_s)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
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
            return (self.dir / "etcd.log").read_text(errors="replace")
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

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/health", timeout=1.0
            ) as answer:
                return b'"true"' in answer.read()
        except OSError:
            return False
