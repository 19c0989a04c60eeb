"""Start and stop the processes of tests and benchmarks: one way, for every launcher.

:func:`spawn` starts a process in its own session (so its process group is its own,
numbered by its PID); :func:`stop_group` ends it by that PID: SIGTERM to the process,
then, after ``grace_s`` (or as soon as it has exited), SIGKILL to its whole group, so
that no child it started outlives it, and the process is reaped. :func:`kill_group`
is the same without the grace (a crash). The SIGTERM goes to the process alone: it
stops its own children in its own order (dockerd its containerd, a service its
helpers); the SIGKILL sweep then takes whatever is left.

:class:`ServiceProcess` runs `megaflow serve KIND ...`: each service prints
`megaflow KIND ready on HOST:PORT` once it listens; `start` waits for that line
(bounded) and keeps the address. `start_run` starts `megaflow run ARGS...` with its
output in a file.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, AnyStr

import psutil

_READY = re.compile(r"megaflow (\w+) ready on (\S+)")


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **popen)`` in a new session: its group is its own."""
    return subprocess.Popen(list(argv), start_new_session=True, **popen)


def spawn_logged(argv: Sequence[str], log_path: Path, **popen: Any) -> subprocess.Popen[Any]:
    """:func:`spawn` with stdout and stderr appended to ``log_path``."""
    with log_path.open("ab") as log:
        return spawn(argv, stdout=log, stderr=subprocess.STDOUT, **popen)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_group(proc: subprocess.Popen[AnyStr] | None, grace_s: float = 10.0) -> int | None:
    """SIGTERM ``proc``; after ``grace_s`` (or once it has exited) SIGKILL its whole
    group; reap it. Returns its exit status (None for no process). Idempotent."""
    if proc is None:
        return None
    if proc.poll() is None and grace_s > 0:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # Always sweep the group: children may outlive their leader.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def kill_group(proc: subprocess.Popen[AnyStr] | None) -> int | None:
    """SIGKILL ``proc``'s whole group at once (a crash) and reap it."""
    return stop_group(proc, grace_s=0)


def pids_mentioning(text: str) -> dict[int, str]:
    """Processes (not this one) whose command line contains ``text``: pid -> the
    command line, its arguments joined by spaces."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if text in cmdline and proc.pid != os.getpid():
            found[proc.pid] = cmdline
    return found


def start_run(log_path: Path, *args: str) -> subprocess.Popen[str]:
    """`megaflow run ARGS...` as a process (:func:`spawn`), stdout and stderr to
    ``log_path``; end it with :func:`stop_group` or :func:`kill_group`."""
    with log_path.open("w") as sink:
        return spawn(
            [sys.executable, "-m", "megaflow.cli", "run", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
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
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        code = stop_group(self.proc, grace_s)
        self._close()
        return code

    def _close(self) -> None:
        if self._pump_thread is not None:
            self._pump_thread.join(5.0)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash)."""
        kill_group(self.proc)
        self._close()


@contextlib.contextmanager
def deployment(store: str, **services: Sequence[str]) -> Iterator[dict[str, ServiceProcess]]:
    """A scheduler (free port, ledger ``store``) and one `megaflow serve KIND` for each
    keyword, in order (name -> its arguments; the kind is the name less trailing
    digits), registered with it; all stopped in reverse order on exit."""
    procs: dict[str, ServiceProcess] = {}
    try:
        sched = ServiceProcess("scheduler", "--listen", "127.0.0.1:0", "--store", store)
        procs["scheduler"] = sched.start()
        for name, args in services.items():
            kind = name.rstrip("0123456789")
            procs[name] = ServiceProcess(kind, "--scheduler", sched.address, *args).start()
        yield procs
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def live_sandboxes(root: Path) -> list[str]:
    """The local sandboxes under `root` still held (their folder has an owner file)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "owner.json").exists())


@contextlib.contextmanager
def openenv_server(tmp: Path, *args: str) -> Iterator[ServiceProcess]:
    """`megaflow serve openenv` on a free port with its sandboxes under `tmp/sandboxes`
    (and `args`); stopped at the end, which must exit 0 and leave no sandbox."""
    root = tmp / "sandboxes"
    proc = ServiceProcess(
        "openenv", "--listen", "127.0.0.1:0", "--sandbox-dir", str(root),
        "--log-level", "warning", *args, log_path=tmp / "openenv.log",
    )  # fmt: skip
    proc.start(timeout_s=60.0)
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.output()
        assert not live_sandboxes(root), f"sandboxes left after the server stopped: {root}"
