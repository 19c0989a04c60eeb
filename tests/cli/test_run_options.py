"""Options of `megaflow run` that shape the tasks it submits."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from megaflow.cli.commands import RunPlacement, run_specs
from megaflow.cli.main import app


def test_step_timeout_sets_every_tasks_command_budget() -> None:
    specs = run_specs(3, seed=0, placement=RunPlacement(), step_timeout_s=7.5)
    assert [s.budgets.step_timeout_s for s in specs] == [7.5, 7.5, 7.5]


def test_without_step_timeout_the_agents_default_applies() -> None:
    specs = run_specs(2, seed=0, placement=RunPlacement())
    assert [s.budgets.step_timeout_s for s in specs] == [0.0, 0.0]  # 0: the agent's default


def test_a_step_timeout_of_zero_is_refused() -> None:
    result = CliRunner().invoke(app, ["run", "--step-timeout", "0"])
    assert result.exit_code == 2
    assert "step-timeout" in result.output


def test_resume_of_a_run_id_without_a_scheduler_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run-abc")])
    assert result.exit_code == 2
    assert "needs --scheduler" in " ".join(result.output.split())


def test_insecure_registry_with_a_scheduler_is_refused() -> None:
    args = ["run", "--scheduler", "127.0.0.1:1", "--insecure-registry", "127.0.0.1:5000"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--insecure-registry configures the embedded" in " ".join(result.output.split())
