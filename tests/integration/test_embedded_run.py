"""`megaflow run` on the embedded default: real sandboxes, simulated model, real rewards."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.testing.simulated_model import SimulatedPolicy

pytestmark = pytest.mark.integration


def test_run_32_tasks_writes_results_and_trajectories(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sandboxes = tmp_path / "sandboxes"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaflow.cli",
            "run",
            "--tasks",
            "32",
            "--concurrency",
            "8",
            "--success-rate",
            "0.8",
            "--time-scale",
            "0.1",
            "--out",
            str(out),
            "--sandbox-dir",
            str(sandboxes),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mean reward" in proc.stderr  # the summary table
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 32
    assert {r["task_id"] for r in results} == {f"swe-synth-0-{i:05d}" for i in range(32)}
    for r in results:
        assert set(r) >= {"task_id", "status", "reward", "attempts", "steps", "error_kind"}
        assert r["status"] == "succeeded" and r["error_kind"] == "none" and r["attempts"] == 1
    # The reward is the hidden tests' verdict: 1 exactly where the policy chose the real fix.
    policy = SimulatedPolicy(success_rate=0.8, seed=0)
    for r in results:
        assert r["reward"] == (1.0 if policy.solves(r["task_id"]) else 0.0), r
    mean = sum(r["reward"] for r in results) / len(results)
    assert abs(mean - 0.8) <= 3 * math.sqrt(0.8 * 0.2 / 32)
    trajectories = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == 32
    first = trajectories[0]
    roles = [m["role"] for m in first["messages"]]
    assert roles[:2] == ["system", "user"] and "assistant" in roles and "tool" in roles
    assert any(o.get("content") for t in first["turns"] for o in t.get("observations", []))
    # nothing left behind
    assert not sandboxes.exists() or not any(sandboxes.iterdir())


def test_zero_success_rate_gets_zero_reward_from_the_hidden_tests(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaflow.cli",
            "run",
            "--tasks",
            "4",
            "--success-rate",
            "0",
            "--time-scale",
            "0",
            "--out",
            str(out),
            "--sandbox-dir",
            str(tmp_path / "sb"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in results] == [0.0] * 4
    assert all(r["status"] == "succeeded" for r in results)  # scored, not crashed
