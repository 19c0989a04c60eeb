"""`python -m bench chaos` told to stop (SIGTERM, as a CI runner or `kill` sends) stops
its whole deployment first: the services run in their own sessions, so before, they
outlived the driver (with their sandboxes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from megaflow.testing.processes import kill_group, pids_mentioning, spawn

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _deployment(tmp_path: Path, address: str) -> dict[int, str]:
    return {**pids_mentioning(str(tmp_path)), **pids_mentioning(address)}


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(240)
def test_sigterm_stops_the_deployment_before_the_driver_exits(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    with log.open("w") as sink:
        bench = spawn(
            [sys.executable, "-m", "bench", "chaos", "--quick"],
            cwd=REPO,
            env={**os.environ, "TMPDIR": str(tmp_path)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        # the client is submitting: every service is up and sandboxes are being made
        _wait_for(lambda: any(tmp_path.glob("megaflow-chaos-*/chaos/out")), 120, "the run")
        _wait_for(
            lambda: any(tmp_path.glob("megaflow-chaos-*/chaos/sandboxes-env*/*/workspace")),
            60,
            "a sandbox",
        )
        # the services name the run's folder (store, sandboxes) or the scheduler's address
        address = next(
            cmdline.split("--listen ")[1].split()[0]
            for cmdline in pids_mentioning(str(tmp_path)).values()
            if " serve scheduler " in cmdline
        )
        services = _deployment(tmp_path, address)
        kinds = [
            k
            for k in ("scheduler", "agent", "env", "model")
            for c in services.values()
            if f" serve {k} " in c
        ]
        assert sorted(kinds) == ["agent"] * 2 + ["env"] * 2 + ["model"] * 2 + ["scheduler"]
        envs = [pid for pid, cmdline in services.items() if " serve env " in cmdline]
        assert len(envs) == 2, services
        bench.send_signal(signal.SIGTERM)
        code = bench.wait(timeout=120)
    finally:
        if bench.poll() is None:
            kill_group(bench)
    output = log.read_text()
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "stopping the deployment" in output
    assert _deployment(tmp_path, address) == {}, output[-3000:]
    assert not list(tmp_path.glob("megaflow-chaos-*")), "its folder was not removed"
    # the env services' sandboxes went with them (their cgroups are named by the env's pid)
    cgroups = [p for pid in envs for p in Path("/sys/fs/cgroup").rglob(f"megaflow-sb-{pid}-*")]
    assert cgroups == []
