"""The chaos run's checks find what they are for (no processes: hand-made outputs)."""

from __future__ import annotations

import json
from pathlib import Path

from megaflow.testing.chaos_checks import check_against_undisturbed, check_outputs


def _write(folder: Path, name: str, records: list[dict[str, object]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def _result(task_id: str, reward: float | None, status: str = "succeeded") -> dict[str, object]:
    kind = "none" if reward is not None else "infra"
    return {"task_id": task_id, "status": status, "reward": reward, "error_kind": kind}


def test_an_outcome_that_differs_from_the_undisturbed_run_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "out", "results.jsonl", [_result("t0", 1.0), _result("t1", 0.0)])
    _write(tmp_path / "ref", "results.jsonl", [_result("t0", 1.0), _result("t1", 1.0)])
    assert check_against_undisturbed(tmp_path / "out", tmp_path / "ref") == [
        "t1: succeeded reward 0.0 under chaos, succeeded reward 1.0 undisturbed"
    ]
    _write(tmp_path / "ref", "results.jsonl", [_result("t0", 1.0), _result("t1", 0.0)])
    assert check_against_undisturbed(tmp_path / "out", tmp_path / "ref") == []


def test_duplicates_losses_and_rewarded_infrastructure_failures_are_reported(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    bad = {**_result("t1", 0.0, "failed"), "error_kind": "infra"}
    _write(out, "results.jsonl", [_result("t0", None, "failed"), bad, bad])
    _write(out, "trajectories.jsonl", [{"task_id": "t0"}, {"task_id": "t1"}])
    problems = check_outputs(out, tasks=3, success_rate=0.8)
    assert "results: 1 duplicated" in problems
    assert "results: 1 lost of 3" in problems and "trajectories: 1 lost of 3" in problems
    assert any(p.startswith("infrastructure failure with a reward") for p in problems)
