"""`megaflow run` into a folder that holds an earlier run: it replaces that run's
outputs, unless that run is still going there."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megaflow.cli.main import app
from megaflow.scheduler.recovery import LEASE
from megaflow.store.sqlite import SqliteLedger

pytestmark = pytest.mark.integration  # real sandboxes


def _run(out: Path, tmp_path: Path, tasks: int) -> tuple[int, str]:
    args = ["--tasks", str(tasks), "--concurrency", "2", "--out", str(out)]
    result = CliRunner().invoke(app, ["run", *args, "--sandbox-dir", str(tmp_path / "sandboxes")])
    return result.exit_code, result.output


def test_a_second_run_into_the_same_folder_replaces_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _ = _run(out, tmp_path, 3)
    assert code == 0
    code, output = _run(out, tmp_path, 2)
    assert code == 0, output  # was: "task ids already submitted" and a traceback
    assert "replacing the previous run's outputs" in output
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_a_run_still_going_in_the_folder_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    async def hold() -> None:
        ledger = SqliteLedger(out / "ledger.sqlite")
        await ledger.open()
        assert await ledger.acquire_lease(LEASE, "scheduler-elsewhere", 300.0)
        await ledger.close()

    asyncio.run(hold())
    code, output = _run(out, tmp_path, 2)
    assert code == 2
    assert "a run is still going in" in output and "scheduler-elsewhere" in output
    assert (out / "ledger.sqlite").exists()
