"""`megaflow run --tasks-from` and `megaflow validate --tasks-from`: bad rows are listed
with row and field, the good rows run; validation finds the broken instances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megaflow.cli.main import app
from megaflow.testing.swebench_set import build_swebench_rootfs, build_swebench_set

pytestmark = pytest.mark.integration  # real sandboxes

GOOD = [
    {"task_id": "ok-1", "problem_statement": "Nothing to do.", "eval_command": "true"},
    {"task_id": "ok-2", "problem_statement": "Make done.txt.", "eval_command": "test -f done.txt"},
]
BAD = [
    {"task_id": "bad-1", "problem_statement": ""},
    {"instance_id": "x__y-1", "repo": "x/y", "problem_statement": "p", "FAIL_TO_PASS": "[]"},
    {"task_id": "bad-2", "problem_statement": "p", "max_steps": "many"},
]


def test_run_lists_bad_rows_and_runs_the_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD[0], *BAD, GOOD[1]]) + "{oops\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            *("run", "--tasks-from", str(path), "--out", str(out), "--time-scale", "0"),
            *("--sandbox-dir", str(tmp_path / "sb")),
        ],
    )
    assert result.exit_code == 1, result.output  # ran, but the set has bad rows
    lines = result.output.splitlines()
    for row, field in [
        (2, "problem_statement"),
        (3, "base_commit"),
        (4, "max_steps"),
    ]:
        assert any(f"row {row}: field '{field}'" in line for line in lines), result.output
    assert any("row 6: not valid JSON" in line for line in lines)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["task_id"] for r in records) == ["ok-1", "ok-2"]
    assert all(r["status"] == "succeeded" for r in records)
    assert {r["task_id"]: r["reward"] for r in records}["ok-1"] == 1.0


def test_an_unreadable_set_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--tasks-from", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no task file" in result.output


@pytest.mark.timeout(300)
def test_validate_reports_broken_instances(tmp_path: Path) -> None:
    rows, url_template = build_swebench_set(tmp_path / "set")
    swebench_rootfs = build_swebench_rootfs(tmp_path / "rootfs")
    wrong_fix = dict(rows[1], instance_id="mpmath__mpmath-9002", patch=rows[0]["patch"])
    tests_miss = dict(rows[2], instance_id="mpmath__mpmath-9003", patch="", FAIL_TO_PASS="[]")
    no_gold = dict(rows[2], instance_id="mpmath__mpmath-9004", patch="")
    path = tmp_path / "set.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [rows[0], wrong_fix, tests_miss, no_gold])
    )
    config = json.dumps({"git_url_template": url_template})
    result = CliRunner().invoke(
        app,
        [
            *("validate", "--tasks-from", str(path), "--source-config", config),
            *("--image", f"dir:{swebench_rootfs}", "--sandbox-dir", str(tmp_path / "sb")),
        ],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 1, result.output
    table = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "ok" in table["mpmath__mpmath-1001"] and "BROKEN" not in table["mpmath__mpmath-1001"]
    assert "BROKEN" in table["mpmath__mpmath-9002"]
    assert "the gold patch does not apply" in table["mpmath__mpmath-9002"]
    assert "BROKEN" in table["mpmath__mpmath-9004"] and "no gold solution" in result.output
    assert "row 3: field 'FAIL_TO_PASS'" in result.output
    assert "1 of 3 task(s) valid, 2 broken" in result.output
