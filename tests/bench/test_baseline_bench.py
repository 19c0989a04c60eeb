"""The baseline comparison (bench/baseline_bench.py) at tiny scale: the fault model, both
sides, the sustainability rule and the report. Simulated times are scaled to ~50 ms a
task, so this runs in seconds (MegaFlow's retry backoff, 1 s, dominates)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bench.baseline.report import FrontierPoint, Outcome, frontier_table, judge
from bench.baseline.scenario import FaultyEnv, Frontier, Mechanism, MeteredGpu, Scenario
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
    env = FaultyEnv(sc, sc.megaflow_path())
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
    sc = TINY.model_copy(update={"fault_rate": 0.0, "time_scale": 1.0, "docker_run_s": 0.05})
    env = FaultyEnv(sc, sc.monolith_path(), cores=1)
    requests = [env_pb2.CreateEnvironmentRequest(owner=f"t{i}#1") for i in range(4)]
    await asyncio.gather(*(env.create_environment(r) for r in requests))
    assert env.core_wait_s > 0  # three of four waited for the single core
    free = FaultyEnv(sc, sc.monolith_path())
    await asyncio.gather(*(free.create_environment(r) for r in requests))
    assert free.core_wait_s == 0


NO_WORK = {"step_s": 0.0, "edit_s": 0.0, "scoring_s": 0.0, "fault_rate": 0.0}


@pytest.mark.parametrize(
    ("mechanism", "cost_s", "cpu"),
    [("docker_exec", 0.0515, 1.0), ("swerex", 0.1157, 0.07), ("none", 0.0, 0.0)],
)
async def test_monolith_steps_pay_the_measured_per_command_cost(
    mechanism: Mechanism, cost_s: float, cpu: float
) -> None:
    # The defaults are the figures of docs/benchmarks.md (docker exec 51.5 ms, SWE-ReX
    # 115.7 ms p50) and exec_cost's CPU shares; a command with no work of its own costs
    # exactly that, and its CPU part holds one of the node's cores.
    sc = TINY.model_copy(update={**NO_WORK, "time_scale": 0.5})
    env = FaultyEnv(sc, sc.monolith_path(mechanism), cores=1)
    created = await env.create_environment(env_pb2.CreateEnvironmentRequest(owner="t#1"))
    t0 = time.monotonic()
    for _ in range(3):
        await env.execute_step(env_pb2.ExecuteStepRequest(env_id=created.env_id, command="ls"))
    took = (time.monotonic() - t0) / sc.time_scale / 3
    assert env.path_s_per_op() == pytest.approx(cost_s)
    assert took >= cost_s * 0.99
    assert env.cpu_seconds == pytest.approx(sc.docker_run_s * sc.docker_run_cpu + 3 * cost_s * cpu)


def test_megaflow_path_is_its_measured_service_path() -> None:
    path = Scenario().megaflow_path()
    assert path.op_s == pytest.approx(0.00051)  # ExecuteStep over gRPC, p50
    assert path.create_s == pytest.approx(0.00139)  # warm claim over gRPC, p50


async def test_monolith_step_latency_includes_the_exec_cost() -> None:
    sc = TINY.model_copy(update={**NO_WORK, "time_scale": 0.2})
    with_exec = await monolith_level(sc, 2, "docker_exec")
    without = await monolith_level(sc, 2, "none")
    assert with_exec.path_s_per_op == pytest.approx(sc.docker_exec_s)
    assert without.path_s_per_op == 0.0
    # each turn's tool calls went through `docker exec`: its cost is in the step
    assert with_exec.mean_env_s - without.mean_env_s >= 0.5 * sc.docker_exec_s
    assert with_exec.mean_step_s > without.mean_step_s


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


TINY_FRONTIER = Frontier.matching(TINY, (1.0, 4.0))


async def test_report_has_the_table_and_small_plots(tmp_path: Path) -> None:
    figures = await run(
        scenario=TINY.model_copy(update={"fault_rate": 0.0}),
        docs_dir=tmp_path,
        frontier_config=TINY_FRONTIER,
    )
    text = (tmp_path / "baseline.md").read_text()
    for needle in ("max sustainable concurrency", "| monolith |", "| MegaFlow |", "## Method"):
        assert needle in text
    for needle in ("Sensitivity", "| docker exec (headline) |", "| SWE-ReX |", "| no exec cost |"):
        assert needle in text
    for mech in ("docker_exec", "swerex", "none"):
        assert f"step_ratio_{mech}" in figures
    assert "## Workload frontier" in text and "| 4x |" in text and "throughput ratio" in text
    assert "Why the two ratios move together" in text
    rows = {ln.split(" | ")[0]: ln.split(" | ") for ln in text.splitlines() if ln.startswith("| ")}
    tokens = {x: float(rows[f"| {x}x"][1].replace(",", "")) for x in ("1", "4")}
    assert tokens["4"] == pytest.approx(4 * tokens["1"], rel=0.02)  # the GPU saw 4x prompts
    for scale in ("x1", "x4"):  # the comparison ran again at each context scale
        assert f"frontier_{scale}_concurrency_ratio" in figures
        assert f"frontier_{scale}_step_ratio" in figures
    for name in ("throughput.png", "step_latency.png", "gpu_utilisation.png", "frontier.png"):
        data = (tmp_path / "baseline" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 100_000
        assert f"baseline/{name}" in text
    assert figures["monolith_max_concurrency"] >= 2
    assert figures["megaflow_max_concurrency"] >= 4


async def test_gpu_sees_prompts_at_the_context_scale() -> None:
    # A prompt of 100 tokens at context x10 is prefilled as 1,000 tokens; the next turn
    # of the same task (sticky: a prefix hit) pays only its scaled new suffix, the
    # previous completion (part of the next prompt) included.
    sc = TINY.model_copy(
        update={
            "time_scale": 0.01,
            "model_overhead_s": 0.0,
            "decode_s_per_token": 0.0,
            "prefill_s_per_token": 0.001,
            "model_jitter": 0.0,
        }
    )
    plain, scaled = MeteredGpu(sc.latency_config()), MeteredGpu(sc.latency_config(), 10.0)
    assert (await plain.serve(100, 5, "t")).modelled_s == pytest.approx(0.1 * 0.01)
    assert (await scaled.serve(100, 5, "t")).modelled_s == pytest.approx(1.0 * 0.01)
    # cached: the scaled prompt and the scaled completion (1,000 + 50): 450 new tokens
    assert (await scaled.serve(150, 5, "t")).modelled_s == pytest.approx(0.45 * 0.01)
    assert scaled.prompt_tokens == 2500 and scaled.calls == 2


def test_shrunk_scenario_keeps_the_ratios() -> None:
    full = Scenario()
    small = full.shrunk(8)
    assert small.replicas == full.replicas  # round-robin misses as often
    assert small.gpu_slots * 8 == full.gpu_slots
    assert small.env_cores * 8 == full.env_cores
    assert small.node_memory_gib * 8 == full.node_memory_gib
    assert full.shrunk(1) == full
    for bad in (0, 3, 16):  # 16 divides the slots but not the 104 sandbox cores
        with pytest.raises(ValueError, match="shrink factor"):
            full.shrunk(bad)


def test_frontier_scenarios() -> None:
    sub = Frontier().scenario(Scenario(), 3.0)
    assert sub.context_scale == 3.0 and sub.gpu_slots == Scenario().gpu_slots // 8
    assert sub.monolith_variants == (Scenario().monolith_exec,)
    assert sub.baseline_levels == Frontier().baseline_levels
    for scales in ((1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="distinct"):
            Frontier(context_scales=scales)


def test_frontier_point_counts_the_targets_it_meets() -> None:
    def outcome(n: int, step_s: float, util: float) -> Outcome:
        level = _level(n, 100.0, 1.0)
        level.mean_step_s, level.utilisation = step_s, util
        return Outcome("x", [level], 1.0, 1 << 30, best=level)

    assert FrontierPoint(1.0, outcome(10, 1.0, 0.1), outcome(150, 0.5, 0.9)).met() == 3
    point = FrontierPoint(1.0, outcome(10, 1.0, 0.1), outcome(149, 0.51, 0.86))
    assert point.ratios == pytest.approx((14.9, 0.51)) and point.met() == 0
    failed = Outcome("x", [outcome(10, 1.0, 0.1).levels[0]], 1.0, 1)
    failed.levels[0].why_not = "p99 step 3000 ms > SLA"
    point = FrontierPoint(1.0, failed, outcome(150, 0.5, 0.9))
    assert point.met() == 0
    _, rows = frontier_table([point])
    assert rows[0][2] == "none (p99 step 3000 ms > SLA)" and rows[0][3] == "150"
