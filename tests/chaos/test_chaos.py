"""The chaos suite, CI-sized: 60 tasks on a live deployment (scheduler, 2 agents, 2 envs
with real local sandboxes, 2 simulated models, `megaflow run --scheduler`) while one
kill -9 each of the scheduler, an agent, an env and a model replica, one sandbox
killed from outside and one sandbox frozen from outside (a hang) land at seeded points
of the run. Every task ends once with its true reward (as in an undisturbed run of the
same tasks and seed), nothing is written twice or lost, and nothing (sandbox, cgroup,
process, mount) is left behind. On the SQLite store (the embedded default), on a
private redis-server (the distributed default) and on a private etcd."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.testing.chaos import KINDS, ChaosConfig, format_report, report, run_chaos
from megaflow.testing.etcd_server import etcd_available
from megaflow.testing.redis_server import redis_available

pytestmark = pytest.mark.integration
needs_redis = pytest.mark.skipif(bool(redis_available()), reason=str(redis_available()))
needs_etcd = pytest.mark.skipif(bool(etcd_available()), reason=str(etcd_available()))


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "store",
    [
        "sqlite",
        pytest.param("redis", marks=needs_redis),
        pytest.param("etcd", marks=needs_etcd),
    ],
)
def test_one_fault_of_each_kind_every_task_once_with_its_true_reward(
    tmp_path: Path, store: str
) -> None:
    config = ChaosConfig(
        tasks=60,
        concurrency=10,
        seed=7,
        kills_per_kind=1,
        sandbox_faults=1,
        step_timeout_s=8.0,
        # slower model turns: a restart (1-9 s on a busy 2-core machine) then costs fewer
        # finished tasks, and the last fault still lands while the run is going
        time_scale=2.5,
        window=(0.1, 0.6),
        run_timeout_s=300,
        store=store,  # type: ignore[arg-type]
    )
    figures = run_chaos(tmp_path / "chaos", config)
    print("\n" + format_report(figures))
    # exactly once, true rewards, each outcome that of the undisturbed run, nothing left
    assert figures["undisturbed_exit"] == 0
    assert figures["problems"] == [], figures["run_log_tail"]
    figures_of = report(figures)
    # every scheduled fault found its moment (a point of the run's progress) while the
    # run was going; one that did not is named, with why
    never = [
        f"{e['kind']} ({e['name']}, at {e['at_fraction']:.0%} of results): {e['skipped']}"
        for e in figures["events"]
        if "skipped" in e
    ]
    assert never == [], "faults that never found their moment: " + "; ".join(never)
    assert figures_of["faults"] == dict.fromkeys(KINDS, 1), figures["events"]
    # the faults cost attempts: the tasks on the killed agent/env/scheduler went again
    assert figures_of["retried_tasks"] >= 1
    assert figures_of["tasks"] == config.tasks
