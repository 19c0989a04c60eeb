"""A private server process for tests and benchmarks (redis-server, etcd, ...).

A subclass says how to start its server (`_argv`) and how to tell it is ready
(`_ready`); this base runs it with :func:`~megaflow.testing.processes.spawn` (its own session),
its output in `<dir>/<name>.log`, waits for readiness with a deadline (the log in the
error), and ends it by PID (:func:`~megaflow.testing.processes.stop_group`): `stop`
(SIGTERM, then SIGKILL of its group, and the folder is deleted), `kill` (SIGKILL of
its group: a crash; the data stays) and `restart` (same ports, same data).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from megaflow.testing.processes import kill_group, spawn_logged, stop_group


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout_s: float,
    detail: Callable[[], str] = str,
    poll_s: float = 0.1,
) -> None:
    """Poll `check` until it is true; AssertionError naming `what` (and `detail()`) after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {detail()}")
        time.sleep(poll_s)


class LocalServer:
    name: ClassVar[str]  # the log's name and how errors call the server
    poll_s: ClassVar[float] = 0.01

    def __init__(self, parent: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"mf-{self.name}-", dir=parent or "/tmp"))
        self._proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    def start(self, timeout_s: float = 30.0) -> Self:
        """Spawn the server and wait (at most `timeout_s`) until it is ready."""
        self._proc = spawn_logged(self._argv(), self.log_path)
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._end(grace_s=2.0)
                raise RuntimeError(f"{self.name} did not become ready:\n{self.log()[-4000:]}")
            time.sleep(self.poll_s)
        return self

    def kill(self) -> None:
        """SIGKILL the server's group (a crash); its data folder stays."""
        proc, self._proc = self._proc, None
        kill_group(proc)

    def restart(self, timeout_s: float = 30.0) -> Self:
        """Start again on the same ports and data folder (after `kill` or a crash)."""
        self._end()
        return self.start(timeout_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """End the server by PID (SIGTERM, then SIGKILL) and delete its folder."""
        self._end(grace_s)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
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
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _end(self, grace_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        stop_group(proc, grace_s)
