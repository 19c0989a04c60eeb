"""`run_batch` and `EmbeddedSystem`: results in memory, files only when asked, any ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import result_record, run_batch, watch_batch
from megaflow.env.service import EnvServiceConfig
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedBackend, SimulatedPolicy
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration


def _system(tmp_path: Path, ledger: SqliteLedger) -> EmbeddedSystem:
    return EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=0.5)],
        ledger=ledger,
        env_config=EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=4),
    )


async def test_results_come_back_in_memory_and_no_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ledger = SqliteLedger(tmp_path / "given.sqlite")
    submitted: list[str] = []
    async with _system(tmp_path, ledger) as system:
        summary = await run_batch(
            system.scheduler, generate_tasks(4), max_concurrency=4, on_submitted=submitted.append
        )
        # the ledger handed in is the one the scheduler used
        rows = await system.ledger.run(summary.run_id)
    assert submitted == [summary.run_id]
    assert {row.task_id for row in rows} == {f"swe-synth-0-{i:05d}" for i in range(4)}
    policy = SimulatedPolicy(success_rate=0.5, seed=0)
    assert len(summary.finished_tasks) == 4
    for done in summary.finished_tasks:
        assert done.result.state == common_pb2.TASK_STATE_SUCCEEDED
        assert done.result.reward == (1.0 if policy.solves(done.result.task_id) else 0.0)
        assert done.trajectory is not None and done.trajectory.turns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.sqlite", "sb"]


async def test_files_are_written_when_a_folder_is_given_and_watch_rewrites_them(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    async with _system(tmp_path, SqliteLedger(tmp_path / "ledger.sqlite")) as system:
        summary = await run_batch(system.scheduler, generate_tasks(3), out, collect=False)
        assert summary.finished_tasks == []  # not kept when not asked for
        first = (out / "results.jsonl").read_text().splitlines()
        (out / "results.jsonl").write_text("")
        again = await watch_batch(system.scheduler, summary.run_id, out)
    assert len(first) == 3
    assert sorted((out / "results.jsonl").read_text().splitlines()) == sorted(first)
    assert again.finished == 3 and len(again.finished_tasks) == 3


def test_the_results_record_carries_per_test_outcomes() -> None:
    result = common_pb2.TaskResult(
        task_id="t",
        state=common_pb2.TASK_STATE_SUCCEEDED,
        has_reward=True,
        reward=0.0,
        tests=[
            common_pb2.TestOutcome(test_id="tests/a.py::test_x[1 2]", status="passed", group="P"),
            common_pb2.TestOutcome(test_id="tests/a.py::test_y", status="failed", group="F"),
        ],
    )
    record = json.loads(json.dumps(result_record(result)))
    assert record["tests"] == [
        {"test_id": "tests/a.py::test_x[1 2]", "status": "passed", "group": "P"},
        {"test_id": "tests/a.py::test_y", "status": "failed", "group": "F"},
    ]


def test_embedded_system_needs_exactly_one_ledger(tmp_path: Path) -> None:
    backend = SimulatedBackend.fast()
    with pytest.raises(InvalidRequestError):
        EmbeddedSystem(backends=[backend])
    with pytest.raises(InvalidRequestError):
        EmbeddedSystem(
            backends=[backend],
            ledger=SqliteLedger(tmp_path / "a.sqlite"),
            ledger_path=tmp_path / "b.sqlite",
        )
