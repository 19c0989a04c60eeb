"""Re-attaching to a run on a deployment: `megaflow watch RUN_ID` after the client that
submitted it was killed, and the Python client's `watch`. Real processes over gRPC."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import megaflow
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.processes import deployment, kill_group, start_run
from megaflow.testing.simulated_model import SimulatedPolicy

pytestmark = pytest.mark.integration

TASKS = 10
WATCH = [sys.executable, "-m", "megaflow.cli", "watch"]
RUN = [sys.executable, "-m", "megaflow.cli", "run"]


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[str]:
    """A scheduler with one model, env and agent process each; yields its address."""
    with deployment(
        str(tmp_path / "ledger.sqlite"),
        model=("--time-scale", "0.2", "--success-rate", "0.8"),
        env=("--sandbox-dir", str(tmp_path / "sb"), "--capacity", "4"),
        agent=(),
    ) as procs:
        yield procs["scheduler"].address


def _wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _results(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_watch_reattaches_to_a_run_whose_client_was_killed(scheduler: str, tmp_path: Path) -> None:
    log, out = tmp_path / "run.log", tmp_path / "out"
    client = start_run(
        log,
        *("--scheduler", scheduler, "--tasks", str(TASKS), "--concurrency", "2"),
        *("--out", str(out)),
    )
    try:
        _wait_for(lambda: "run id: " in log.read_text(), 60, "the run id")
        _wait_for(lambda: len(_results(out / "results.jsonl")) >= 1, 60, "a first result")
    finally:
        kill_group(client)
    run_id = re.search(r"run id: (\S+)", log.read_text())
    assert run_id is not None
    seen_by_client = len(_results(out / "results.jsonl"))
    assert seen_by_client < TASKS, "the client was killed after the run ended"

    watched = tmp_path / "watched"
    proc = subprocess.run(
        [*WATCH, run_id.group(1), "--scheduler", scheduler, "--out", str(watched)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = _results(watched / "results.jsonl")
    ids = [r["task_id"] for r in records]
    assert sorted(ids) == sorted(t.task_id for t in generate_tasks(TASKS))  # each once
    policy = SimulatedPolicy(success_rate=0.8, seed=0)
    for r in records:
        assert r["status"] == "succeeded"
        assert r["reward"] == (1.0 if policy.solves(str(r["task_id"])) else 0.0)
    trajectories = (watched / "trajectories.jsonl").read_text().splitlines()
    assert len(trajectories) == TASKS


async def test_the_python_client_submits_and_reattaches_by_run_id(scheduler: str) -> None:
    tasks = [megaflow.Task.from_proto(spec) for spec in generate_tasks(4, seed=3)]
    async with megaflow.connect(scheduler) as client:
        run = await client.submit(tasks, concurrency=2)
        assert run.run_id and run.task_ids == [t.task_id for t in tasks]
        results_of_run = aiter(run)  # this client stops after one result ...
        first = await anext(results_of_run)
        await results_of_run.aclose()
    async with megaflow.connect(scheduler) as other:  # ... another one re-attaches
        results = await other.watch(run.run_id).results()
    assert results.run_id == run.run_id
    assert sorted(r.task_id for r in results) == sorted(t.task_id for t in tasks)
    assert first.task_id in {r.task_id for r in results}
    assert all(r.status == "succeeded" and r.trajectory is not None for r in results)


async def test_iterating_a_submission_submits_it_and_unknown_runs_are_refused(
    scheduler: str,
) -> None:
    async with megaflow.connect(scheduler) as client:
        got = [r.task_id async for r in client.submit(generate_tasks(2, seed=5))]
        assert sorted(got) == sorted(t.task_id for t in generate_tasks(2, seed=5))
        with pytest.raises(megaflow.NotFoundError, match="no-such-run"):
            await client.watch("no-such-run").results()


def test_watch_of_an_unknown_run_says_so(scheduler: str) -> None:
    proc = subprocess.run(
        [*WATCH, "no-such-run", "--scheduler", scheduler],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no-such-run" in proc.stderr


async def test_a_run_on_a_scheduler_is_resumed_by_its_id(scheduler: str, tmp_path: Path) -> None:
    tasks = generate_tasks(4)
    for spec in tasks[2:]:  # these two fail for the platform: no result, never reward 0
        spec.image, spec.max_attempts = "dir:/no/such/image", 1
    async with megaflow.connect(scheduler) as client:
        first = await (await client.submit(tasks)).results()
        by_id = {r.task_id: r for r in first}
        assert [by_id[t.task_id].scored for t in tasks] == [True, True, False, False]
        fixed = generate_tasks(4)  # the same tasks, their image fixed
        run = await client.resume(first.run_id, fixed)
        assert run.run_id != first.run_id and len(run.task_ids) == 2  # only the unscored
        results = await run.results()
    assert sorted(r.task_id for r in results) == sorted(t.task_id for t in tasks)
    assert all(r.scored for r in results)
    assert [r for r in results if r.task_id in by_id and by_id[r.task_id].scored] == [
        by_id[t.task_id] for t in tasks[:2]
    ]  # kept as they were
    assert all(r.trajectory is not None and r.trajectory.task_id == r.task_id for r in results)

    out = tmp_path / "out"  # the same from the command line, into a folder
    argv = [*RUN, "--scheduler", scheduler, "--tasks", "4", "--resume", first.run_id]
    proc = await asyncio.to_thread(
        subprocess.run,
        [*argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = _results(out / "results.jsonl")
    assert [r["task_id"] for r in records[:2]] == [t.task_id for t in tasks[:2]]
    assert sorted(r["task_id"] for r in records) == sorted(t.task_id for t in tasks)
    assert all(r["reward"] is not None for r in records)
