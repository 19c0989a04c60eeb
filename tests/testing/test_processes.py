"""The one launcher of test processes: a stopped or killed process takes its children."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megaflow.testing.processes import kill_group, spawn, spawn_logged, stop_group

# A parent that starts two grandchildren, prints their pids, then waits: with
# `ignore_term` it survives SIGTERM, as a hung service would.
_PARENT = """
import signal, subprocess, sys
if sys.argv[1] == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
kids = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
signal.pause()
"""


def _start(mode: str) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    proc = spawn([sys.executable, "-c", _PARENT, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    children = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
    proc.stdout.close()
    assert len(children) == 2 and all(c.is_running() for c in children)
    return proc, children


def _gone(children: list[psutil.Process]) -> bool:
    _, alive = psutil.wait_procs(children, timeout=5)
    return not alive


@pytest.mark.parametrize("mode", ["obey_term", "ignore_term"])
def test_stop_group_ends_the_process_and_its_children(mode: str) -> None:
    proc, children = _start(mode)
    assert psutil.Process(proc.pid).children() == [psutil.Process(c.pid) for c in children]
    started = time.monotonic()
    code = stop_group(proc, grace_s=0.5)
    assert code == (-15 if mode == "obey_term" else -9)
    assert time.monotonic() - started < 5
    assert proc.returncode is not None  # reaped
    assert _gone(children)


def test_kill_group_takes_children_that_outlive_their_leader() -> None:
    proc, children = _start("obey_term")
    assert kill_group(proc) == -9
    assert _gone(children)
    assert stop_group(proc) == -9  # idempotent
    assert stop_group(None) is None


def test_spawn_gives_each_process_its_own_group(tmp_path: Path) -> None:
    proc = spawn_logged(["sh", "-c", "echo hello; exec sleep 300"], tmp_path / "log")
    try:
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        deadline = time.monotonic() + 10
        while not (tmp_path / "log").read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop_group(proc, grace_s=1)
    assert (tmp_path / "log").read_text() == "hello\n"
