"""`megaflow.run` / `megaflow.arun` on the embedded default: real sandboxes, the
simulated model, results in memory, files only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import megaflow
from megaflow._tasks import task_specs
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedPolicy
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration


class SourceRow:
    """A task source's own model: anything with to_proto() is a task."""

    def __init__(self, spec: common_pb2.TaskSpec) -> None:
        self.spec = spec

    def to_proto(self) -> common_pb2.TaskSpec:
        return self.spec


def test_run_takes_any_kind_of_task_and_returns_results_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    specs = generate_tasks(3)
    tasks = [megaflow.Task.from_proto(specs[0]), specs[1], SourceRow(specs[2])]
    seen: list[str] = []
    results = megaflow.run(
        tasks,
        concurrency=3,
        time_scale=0,
        sandbox_dir=tmp_path / "sb",
        on_result=lambda r: seen.append(r.task_id),
    )
    policy = SimulatedPolicy(success_rate=0.8, seed=0)
    assert results.run_id.startswith("run-")
    assert sorted(r.task_id for r in results) == sorted(s.task_id for s in specs)
    assert seen == [r.task_id for r in results]
    for r in results:
        assert r.status == "succeeded" and r.error_kind == "none"
        assert r.reward == (1.0 if policy.solves(r.task_id) else 0.0)
        assert r.trajectory is not None and r.trajectory.turns[0].completion_token_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sb"]  # no output files


def test_run_writes_its_outputs_when_given_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = megaflow.run(
        generate_tasks(2), time_scale=0, sandbox_dir=tmp_path / "sb", out=out, success_rate=0
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == [r.task_id for r in results]
    assert all(r["reward"] == 0.0 and r["tests"] == [] for r in records)
    assert (out / "ledger.sqlite").exists()
    assert len((out / "trajectories.jsonl").read_text().splitlines()) == 2


async def test_arun_runs_inside_an_event_loop_and_run_says_to_use_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="arun"):
        megaflow.run(generate_tasks(1))
    results = await megaflow.arun(generate_tasks(1), time_scale=0, sandbox_dir=tmp_path / "sb")
    assert len(results) == 1 and results[0].scored


def test_bad_tasks_and_settings_get_clear_errors() -> None:
    with pytest.raises(megaflow.InvalidRequestError, match="to_proto"):
        megaflow.run([{"problem_statement": "x"}])  # type: ignore[list-item]
    with pytest.raises(megaflow.InvalidRequestError, match="no tasks"):
        megaflow.run([])
    with pytest.raises(megaflow.InvalidRequestError, match="concurrency"):
        megaflow.run(generate_tasks(1), concurrency=0)
    with pytest.raises(megaflow.InvalidRequestError, match="'type'"):
        task_specs(generate_tasks(1), scaffold={"max_steps": 3})


def test_the_scaffold_goes_to_every_task_that_names_none() -> None:
    own = generate_tasks(2)
    own[0].scaffold.type = "mine"
    specs = task_specs(own, scaffold={"type": "tool-agent", "max_steps": 3})
    assert specs[0].scaffold.type == "mine"
    assert specs[1].scaffold.type == "tool-agent"
    assert json.loads(specs[1].scaffold.config_json) == {"max_steps": 3}
    assert not own[1].HasField("scaffold")  # the caller's specs are not changed
    assert task_specs(own, scaffold="x")[1].scaffold == common_pb2.ScaffoldSpec(type="x")
