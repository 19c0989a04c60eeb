"""`megaflow run --scaffold`: every task runs the named scaffold (here mini-swe-agent,
unmodified, on real sandboxes with the simulated model); a scaffold that does not exist
or a bad config is a usage error before any task starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "megaflow.cli", "run", "--out", str(tmp_path / "out")]
    command += ["--sandbox-dir", str(tmp_path / "sb"), "--time-scale", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_every_task_runs_the_named_scaffold(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--tasks", "3", "--scaffold", "mini-swe-agent")
    assert proc.returncode == 0, proc.stderr
    records = [
        json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().split("\n") if x
    ]
    assert len(records) == 3 and all(r["reward"] is not None for r in records), records
    for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines():
        trajectory = json.loads(line)
        system = trajectory["messages"][0]["content"]
        assert "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" in json.dumps(trajectory)  # its prompts
        assert system  # mini-swe-agent's own system template, not the tool agent's
        assert "careful software engineer" not in system
    assert not any((tmp_path / "sb").iterdir())


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("nope", "unknown scaffold 'nope'"),
        ('{"type": "mini-swe-agent", "agent": {"step_limit": "x"}}', "agent.step_limit"),
        ('["mini-swe-agent"]', "must be an object"),
    ],
)
def test_a_bad_scaffold_is_a_usage_error(tmp_path: Path, value: str, says: str) -> None:
    proc = _run(tmp_path, "--tasks", "2", "--scaffold", value)
    assert proc.returncode == 2, proc.stderr
    assert says in " ".join(proc.stderr.replace("│", " ").split()), proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()
