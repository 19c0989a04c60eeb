"""The simulated scorer agrees with the hidden tests for the policy's edits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.tasks.scoring import simulated_reward
from megaflow.tasks.swe_synth import generate_tasks, reference_patch, wrong_patch
from megaflow.v1 import common_pb2


def _apply(task: common_pb2.TaskSpec, patch: tuple[str, str, str]) -> dict[str, bytes]:
    path, old, new = patch
    files = dict(task.files)
    files[path] = files[path].decode().replace(old, new, 1).encode()
    return files


def _hidden_tests_pass(
    files: dict[str, bytes], hidden: dict[str, bytes], eval_command: str, tmp: Path
) -> bool:
    for rel, content in {**files, **hidden}.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(content)
    command = eval_command.replace("python3", sys.executable, 1)
    return subprocess.run(command, shell=True, cwd=tmp, capture_output=True).returncode == 0


@pytest.mark.parametrize("index", range(18))  # every catalogue entry once
def test_simulated_reward_matches_the_hidden_tests(index: int, tmp_path: Path) -> None:
    task = generate_tasks(index + 1, seed=4)[index]
    hidden = dict(task.hidden_files)
    for name, patch, expected in (
        ("buggy", None, 0.0),
        ("fixed", reference_patch(task), 1.0),
        ("decoy", wrong_patch(task), 0.0),
    ):
        files = dict(task.files) if patch is None else _apply(task, patch)
        assert simulated_reward(files, hidden) == expected, name
        passed = _hidden_tests_pass(files, hidden, task.eval_command, tmp_path / name)
        assert passed == (expected == 1.0), name
