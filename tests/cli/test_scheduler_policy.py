"""`megaflow serve scheduler --policy FILE`: scheduler settings from a JSON file."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from megaflow.cli.commands import load_policy
from megaflow.cli.main import app


def test_a_policy_file_sets_quotas_and_retries(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"default_user_max_in_flight": 4, "default_max_attempts": 3}')
    policy = load_policy(path)
    assert policy.default_user_max_in_flight == 4
    assert policy.default_max_attempts == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"no_such_setting": 1}', "no_such_setting"),
        ('{"default_max_attempts": "many"}', "default_max_attempts"),
        ("not json", "not a valid scheduler policy"),
    ],
)
def test_a_bad_policy_file_says_what_is_wrong(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=expected):
        load_policy(path)


def test_serve_scheduler_refuses_a_bad_policy_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"no_such_setting": 1}')
    result = CliRunner().invoke(
        app,
        ["serve", "scheduler", "--policy", str(path), "--store", str(tmp_path / "l.sqlite")],
    )
    assert result.exit_code == 2
    assert "no_such_setting" in result.output
    missing = CliRunner().invoke(app, ["serve", "scheduler", "--policy", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
