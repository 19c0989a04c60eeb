"""Resume: a rerun of an earlier run's folder runs only the tasks without a scored
result, and its outputs end up complete (the earlier scored records kept as they were)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import megaflow
from megaflow.core.errors import ModelUnavailableError
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.processes import kill_group, start_run
from megaflow.testing.scripted import ScriptedBackend, Step, tool_call
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration

RUN = [sys.executable, "-m", "megaflow.cli", "run"]


def _tasks() -> list[common_pb2.TaskSpec]:
    tasks = generate_tasks(4, seed=11)
    for task in tasks:
        task.max_attempts = 1  # an infrastructure failure is final at once
        task.budgets.max_steps = 2
    return tasks


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_resume_runs_only_the_unscored_tasks_and_keeps_the_rest(tmp_path: Path) -> None:
    tasks = _tasks()
    ids = [t.task_id for t in tasks]

    def first_script(task_id: str, _: int) -> Step:
        if task_id == ids[0]:
            return tool_call("submit")  # scored (reward 0: the bug is still there)
        if task_id == ids[1]:
            return tool_call("bash", command="true")  # the step limit: failed, reward 0
        return ModelUnavailableError("upstream 504")  # infra: no reward

    out, sb = tmp_path / "out", tmp_path / "sb"
    first = megaflow.run(tasks, model=ScriptedBackend(first_script), out=out, sandbox_dir=sb)
    by_id = {r.task_id: r for r in first}
    assert (by_id[ids[0]].status, by_id[ids[0]].reward) == ("succeeded", 0.0)
    assert (by_id[ids[1]].error_kind, by_id[ids[1]].reward) == ("task", 0.0)
    assert all(by_id[i].error_kind == "infra" and by_id[i].reward is None for i in ids[2:])
    kept_lines = [
        line for line in _lines(out / "results.jsonl") if json.loads(line)["task_id"] in ids[:2]
    ]

    second = ScriptedBackend(lambda task_id, i: tool_call("submit"))
    results = megaflow.run(tasks, model=second, out=out, resume=out, sandbox_dir=sb)
    assert set(second.calls) == set(ids[2:])  # only the unscored tasks ran
    assert sorted(r.task_id for r in results) == sorted(ids)
    assert all(r.scored for r in results)
    assert {r.task_id: r.reward for r in results}[ids[1]] == 0.0  # kept, not rerun
    lines = _lines(out / "results.jsonl")
    assert lines[:2] == kept_lines  # the earlier records, unchanged, then the new ones
    assert sorted(json.loads(line)["task_id"] for line in lines) == sorted(ids)
    trajectories = [json.loads(x) for x in _lines(out / "trajectories.jsonl")]
    assert sorted(t["task_id"] for t in trajectories) == sorted(ids)

    third = ScriptedBackend(lambda task_id, i: tool_call("submit"))  # all scored now
    again = megaflow.run(tasks, model=third, out=out, resume=out, sandbox_dir=sb)
    assert not third.calls and len(again) == 4
    assert _lines(out / "results.jsonl") == lines


def test_resume_of_a_folder_without_a_run_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(megaflow.InvalidRequestError, match="holds no earlier run"):
        megaflow.run(_tasks(), out=out, resume=out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_megaflow_run_resume_completes_an_interrupted_run(tmp_path: Path) -> None:
    out, sb, log = tmp_path / "out", tmp_path / "sb", tmp_path / "run.log"
    common = ["--tasks", "8", "--concurrency", "1", "--sandbox-dir", str(sb)]
    proc = start_run(log, *common, "--time-scale", "1", "--out", str(out))
    try:
        deadline = time.monotonic() + 120
        while len(_lines(out / "results.jsonl")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_group(proc)
    before = [line for line in _lines(out / "results.jsonl") if line.endswith("}")]
    assert 2 <= len(before) < 8, log.read_text()

    resumed = subprocess.run(
        [*RUN, *common, "--time-scale", "0", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "scored tasks kept" in resumed.stderr
    lines = _lines(out / "results.jsonl")
    assert lines[: len(before)] == before
    assert sorted(json.loads(x)["task_id"] for x in lines) == [t.task_id for t in generate_tasks(8)]
    assert len(_lines(out / "trajectories.jsonl")) == 8
    assert not sb.exists() or not any(sb.iterdir())  # the killed run's sandboxes reclaimed
