"""The chaos suite, CI-sized: 60 tasks on a live deployment (scheduler, 2 agents, 2 envs
with real local sandboxes, 2 simulated models, `megaflow run --scheduler`) while one
kill -9 each of the scheduler, an agent, an env and a model replica lands at seeded
points of the run. Every task ends once with its true reward, nothing is written twice
or lost, and nothing (sandbox, process, mount) is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.testing.chaos import KINDS, ChaosConfig, check_all, format_report, report, run_chaos

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_one_kill9_of_each_service_kind_every_task_once_with_its_true_reward(
    tmp_path: Path,
) -> None:
    config = ChaosConfig(
        tasks=60, concurrency=10, seed=7, kills_per_kind=1, window=(0.1, 0.5), run_timeout_s=240
    )
    figures = run_chaos(tmp_path / "chaos", config)
    print("\n" + format_report(figures))
    assert check_all(figures) == [], figures["run_log_tail"]
    figures_of = report(figures)
    # every scheduled kill landed while the run was going
    assert figures_of["kills"] == dict.fromkeys(KINDS, 1), figures["events"]
    assert figures_of["kills_skipped"] == 0
    # the kills cost attempts: the tasks in flight on the killed agent/env/scheduler went again
    assert figures_of["retried_tasks"] >= 1
    assert figures_of["tasks"] == config.tasks
