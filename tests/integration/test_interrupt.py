"""Ctrl-C during an embedded run: finished results are kept, no sandbox survives."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaflow.testing.processes import kill_group, pids_mentioning, spawn

pytestmark = pytest.mark.integration


def _sandbox_processes(marker: Path) -> list[int]:
    return list(pids_mentioning(str(marker)))


def _start(out: Path, sandboxes: Path) -> subprocess.Popen[str]:
    return spawn(
        [
            sys.executable,
            "-m",
            "megaflow.cli",
            "run",
            "--tasks",
            "400",
            "--concurrency",
            "16",
            "--out",
            str(out),
            "--sandbox-dir",
            str(sandboxes),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigint_releases_every_sandbox_and_keeps_finished_results(tmp_path: Path) -> None:
    out, sandboxes = tmp_path / "out", tmp_path / "sandboxes"
    # a caught SIGINT is reset to the default in the child; an ignored one (pytest
    # started by `nohup` or `cmd &` in a script) would stay ignored and fail the test
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = _start(out, sandboxes)
    finally:
        signal.signal(signal.SIGINT, previous)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until tasks are finishing and others are live
        if results.exists() and results.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert _sandbox_processes(sandboxes), "expected live sandboxes mid-run"
    try:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    assert 3 <= len(kept) < 400
    assert all(r["status"] in ("succeeded", "failed") for r in kept)
    assert not _sandbox_processes(sandboxes)
    assert not sandboxes.exists() or not any(sandboxes.iterdir())
