"""Every command's --help renders (rich markup in help texts must not break it)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from megaflow.cli.main import app

COMMANDS = [
    [],
    ["run"],
    ["status"],
    ["watch"],
    ["serve"],
    ["serve", "scheduler"],
    ["serve", "model"],
    ["serve", "agent"],
    ["serve", "env"],
    ["serve", "openenv"],
    ["env", "gc"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "megaflow")
def test_help_renders(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
