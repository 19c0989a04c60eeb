"""The slower chaos suite: fault classes beyond kill -9, each over 200 tasks on a live
deployment (scheduler, 2 agents, 2 env hosts with real local sandboxes, 2 simulated
models, `megaflow run --scheduler`), on a private redis-server:

- an environment host that HANGS instead of dying: SIGSTOP (it stops heartbeating and
  its calls never answer) until the scheduler has dropped it, then SIGCONT (it comes
  back, re-registers, and must not be used before its clients can reach it again);
- the store's server (redis-server, `appendfsync always`) killed -9 mid-run and
  restarted on its data.

Every task ends exactly once with the outcome of an undisturbed run of the same tasks
and seed (nothing scored for an infrastructure failure), and nothing is left behind.
Each fault fires at a point of the run's progress; one that never found its moment is
named. About 3-4 minutes on a 2-core machine (two runs of 200 tasks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.testing.chaos import ChaosConfig, format_report, report, run_chaos
from megaflow.testing.redis_server import redis_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(redis_available()), reason=str(redis_available())),
]
TASKS = 200


@pytest.mark.timeout(900)
def test_a_hung_env_host_and_a_restarted_store_cost_no_task_its_outcome(tmp_path: Path) -> None:
    config = ChaosConfig(
        tasks=TASKS,
        concurrency=16,
        seed=11,
        kills_per_kind=0,
        sandbox_faults=0,
        env_hangs=1,
        store_restarts=1,
        step_timeout_s=8.0,
        time_scale=1.0,
        window=(0.15, 0.6),
        run_timeout_s=600,
        store="redis",
    )
    figures = run_chaos(tmp_path / "chaos", config)
    print("\n" + format_report(figures))
    never = [
        f"{e['kind']} ({e['name']}, at {e['at_fraction']:.0%} of results): {e['skipped']}"
        for e in figures["events"]
        if "skipped" in e
    ]
    assert never == [], "faults that never found their moment: " + "; ".join(never)
    # exactly once, true rewards, each outcome that of the undisturbed run, nothing left
    assert figures["undisturbed_exit"] == 0
    assert figures["problems"] == [], figures["run_log_tail"]
    assert figures["run_exit"] == 0, figures["run_log_tail"]
    figures_of = report(figures)
    assert figures_of["tasks"] == TASKS
    assert figures_of["faults"]["env_hang"] == 1 and figures_of["faults"]["store"] == 1
    (hang,) = [e for e in figures["events"] if e["kind"] == "env_hang"]
    assert "lost_s" in hang, hang  # the scheduler dropped the hung host
