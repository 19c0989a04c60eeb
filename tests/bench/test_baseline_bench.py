"""The baseline comparison (bench/baseline_bench.py) at tiny scale: the fault model, both
sides, the sustainability rule and the report. Simulated times are scaled to ~50 ms a
task, so this runs in seconds (MegaFlow's retry backoff, 1 s, dominates)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.baseline.report import judge
from bench.baseline.scenario import FaultyEnv, Scenario
from bench.baseline.sides import Level, megaflow_level, monolith_level
from bench.baseline_bench import run
from megaflow.core.errors import SandboxError
from megaflow.v1 import env_pb2

TINY = Scenario(
    time_scale=0.02,
    waves=2,
    replicas=2,
    slots_per_replica=2,
    node_cores=4,
    inference_cores=2,
    fault_rate=0.05,
    baseline_levels=(2, 4),
    megaflow_levels=(4, 8),
)


async def _fault_pattern(sc: Scenario, attempt: int) -> list[bool]:
    """Which of 40 tasks' creates and first steps fail, at this attempt."""
    env = FaultyEnv(sc)
    pattern = []
    for i in range(40):
        try:
            created = await env.create_environment(
                env_pb2.CreateEnvironmentRequest(owner=f"task-{i}#{attempt}")
            )
            pattern.append(False)
            await env.execute_step(env_pb2.ExecuteStepRequest(env_id=created.env_id, command="ls"))
            pattern.append(False)
        except SandboxError:
            pattern.append(True)
    return pattern


async def test_faults_are_a_pure_function_of_seed_attempt_and_op() -> None:
    sc = TINY.model_copy(update={"fault_rate": 0.3, "time_scale": 0.0})
    first = await _fault_pattern(sc, 1)
    assert first == await _fault_pattern(sc, 1)  # same attempt: the same faults
    assert first != await _fault_pattern(sc, 2)  # a retry draws anew
    assert 5 < sum(first) < 35
    other_seed = await _fault_pattern(sc.model_copy(update={"seed": 1}), 1)
    assert other_seed != first


async def test_cores_bound_concurrent_environment_work() -> None:
    sc = TINY.model_copy(update={"fault_rate": 0.0, "time_scale": 1.0, "create_s": 0.05})
    env = FaultyEnv(sc, cores=1)
    requests = [env_pb2.CreateEnvironmentRequest(owner=f"t{i}#1") for i in range(4)]
    await asyncio.gather(*(env.create_environment(r) for r in requests))
    assert env.core_wait_s > 0  # three of four waited for the single core
    free = FaultyEnv(sc)
    await asyncio.gather(*(free.create_environment(r) for r in requests))
    assert free.core_wait_s == 0


async def test_monolith_loses_faulted_tasks_megaflow_retries_them(tmp_path: Path) -> None:
    mono = await monolith_level(TINY, 4)
    assert mono.tasks == TINY.waves * 4
    assert mono.faults > 0 and mono.failed == mono.faults  # each fault ends a task
    assert mono.retries == 0
    flow = await megaflow_level(TINY, 4, tmp_path)
    assert flow.tasks == TINY.waves * 4
    assert flow.faults > 0 and flow.retries == flow.faults
    assert flow.failed == 0 and flow.failure_rate == 0.0
    for level in (mono, flow):
        assert level.steps_measured > 0 and level.mean_step_s > 0
        assert 0.0 < level.utilisation <= 1.0


def _level(n: int, steps_per_s: float, p99_s: float) -> Level:
    nan = float("nan")
    return Level(
        "x", n, 3 * n, 1.0, 1.0, steps_per_s, 0.5, p99_s / 2, p99_s, nan, nan, 1,
        0, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, nan,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("level", "cap", "why"),
    [
        (_level(200, 150.0, 1.0), 1000, ""),
        (_level(200, 105.0, 1.0), 1000, "throughput grew"),
        (_level(200, 150.0, 9.0), 1000, "SLA"),
        (_level(200, 150.0, 1.0), 150, "memory cap"),
    ],
)
def test_judge(level: Level, cap: int, why: str) -> None:
    judge(level, _level(100, 100.0, 1.0), TINY, cap)
    assert level.sustainable == (why == "")
    assert why in level.why_not


async def test_report_has_the_table_and_small_plots(tmp_path: Path) -> None:
    figures = await run(scenario=TINY.model_copy(update={"fault_rate": 0.0}), docs_dir=tmp_path)
    text = (tmp_path / "baseline.md").read_text()
    for needle in ("max sustainable concurrency", "| monolith |", "| MegaFlow |", "## Method"):
        assert needle in text
    for name in ("throughput.png", "step_latency.png", "gpu_utilisation.png"):
        data = (tmp_path / "baseline" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 100_000
        assert f"baseline/{name}" in text
    assert figures["monolith_max_concurrency"] >= 2
    assert figures["megaflow_max_concurrency"] >= 4
