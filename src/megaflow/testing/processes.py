"""Start `megaflow serve ...` (and the `megaflow run` client) as real processes, for
tests and benchmarks.

Each service prints `megaflow KIND ready on HOST:PORT` once it listens; `start`
waits for that line (bounded) and keeps the address. `stop` sends SIGTERM, waits,
then SIGKILLs the process group, so nothing survives its test. `start_run` starts
`megaflow run ARGS...` with its output in a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_READY = re.compile(r"megaflow (\w+) ready on (\S+)")


def start_run(log_path: Path, *args: str, new_session: bool = False) -> subprocess.Popen[str]:
    """`megaflow run ARGS...` as a process, stdout and stderr to ``log_path``
    (``new_session``: in its own session, so that its group can be killed)."""
    with log_path.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "megaflow.cli", "run", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )


class ServiceProcess:
    def __init__(
        self,
        kind: str,
        *args: str,
        log_path: Path | None = None,
        module: str = "megaflow.cli",
    ) -> None:
        """`python -m MODULE serve KIND ARGS...`; `module` lets a benchmark start its own
        variant of a service (same ready line, same registration)."""
        self.kind = kind
        self.module = module
        self.args = args
        self.log_path = log_path
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._pump_thread: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> ServiceProcess:
        argv = [sys.executable, "-m", self.module, "serve", self.kind, *self.args]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        ready = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, args=(ready,), daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"`megaflow serve {self.kind}` did not become ready:\n" + "".join(self._lines)
                )
        return self

    def _pump(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in self.proc.stdout:
                self._lines.append(line)
                if log:
                    log.write(line)
                    log.flush()
                match = _READY.search(line)
                if match and not ready.is_set():
                    self.address = match.group(2)
                    ready.set()
        finally:
            if log:
                log.close()

    def output(self) -> str:
        return "".join(self._lines)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL of the whole group after `grace_s`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        self._close()
        return code

    def _close(self) -> None:
        if self._pump_thread is not None:
            self._pump_thread.join(5.0)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._close()
