"""`megaflow run --model openai:URL` against a real third-party server (llm-katan echo).

The echo model calls the first tool with placeholder arguments every turn, so every
task runs until its step limit: the run must still end with every task terminal,
classified as the task's failure (reward 0), with the upstream's tool calls and our
sandbox's observations in the trajectories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.testing.llm_katan import LlmKatanServer

pytestmark = pytest.mark.integration


def test_run_with_an_openai_compatible_upstream(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with LlmKatanServer() as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "megaflow.cli",
                "run",
                "--model",
                f"openai:{server.base_url}",
                "--tasks",
                "2",
                "--out",
                str(out),
                "--sandbox-dir",
                str(tmp_path / "sb"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "OPENAI_API_KEY": server.api_key},
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2
    for r in results:
        assert (r["status"], r["error_kind"], r["reward"]) == ("failed", "task", 0.0), r
        assert "step limit" in r["error"]
        assert r["prompt_tokens"] > 0  # usage reported by the upstream
    trajectory = json.loads((out / "trajectories.jsonl").read_text().splitlines()[0])
    calls = [c for m in trajectory["messages"] for c in m.get("tool_calls", [])]
    assert calls and calls[0]["name"] == "bash"
    observations = [m["content"] for m in trajectory["messages"] if m["role"] == "tool"]
    assert any("not found" in o for o in observations)  # really ran in our sandbox
