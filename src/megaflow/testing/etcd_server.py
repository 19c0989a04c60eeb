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

import shutil
import urllib.request
from pathlib import Path

from megaflow.testing.server import LocalServer, free_port

ETCD = "etcd"


def etcd_available() -> str | None:
    """None if a private etcd can run here, else why not."""
    if shutil.which(ETCD) is None:
        return "etcd is not installed (Debian package etcd-server; ./dev installs it)"
    return None


class EtcdServer(LocalServer):
    """One private etcd member; ``url`` is ``etcd://127.0.0.1:<client port>``."""

    name = "etcd"
    poll_s = 0.02

    def __init__(self, parent: Path | None = None, max_request_bytes: int | None = None) -> None:
        """``max_request_bytes``: etcd's request-size limit (default: etcd's, 1.5 MiB)."""
        super().__init__(parent)
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"etcd://127.0.0.1:{self.port}"
        self.max_request_bytes = max_request_bytes

    def _argv(self) -> list[str]:
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
        return argv

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/health", timeout=1.0
            ) as answer:
                return b'"true"' in answer.read()
        except OSError:
            return False
