"""The mpmath SWE-bench set end to end, over real sandboxes, real git and real pytest:
the gold patches validate, an agent submitting the gold patch scores 1 with per-test
outcomes, the unpatched repository scores 0."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from megaflow.agent.session import AgentLimits
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import run_batch
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.tasks.sources import LoadedTasks, load_tasks
from megaflow.tasks.validate import validate_tasks
from megaflow.testing.scripted import ScriptedBackend, tool_call
from megaflow.v1 import common_pb2, scheduler_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def mpmath_tasks(
    rows: list[dict[str, Any]], url_template: str, rootfs: Path, tmp_path: Path
) -> LoadedTasks:
    """The set as a user has it: a JSONL file of SWE-bench rows, the image named per row."""
    path = tmp_path / "mpmath.jsonl"
    path.write_text("".join(json.dumps(dict(r, image=f"dir:{rootfs}")) + "\n" for r in rows))
    loaded = load_tasks(path, {"git_url_template": url_template})
    assert loaded.errors == []
    return loaded


def env_config(tmp_path: Path, n: int) -> EnvServiceConfig:
    return EnvServiceConfig(
        root_dir=tmp_path / "sb",
        image_cache_dir=tmp_path / "images",
        artifact_cache_dir=tmp_path / "cache",
        max_environments=n,
    )


async def test_gold_patches_validate(
    mpmath_set: tuple[list[dict[str, Any]], str], swebench_rootfs: Path, tmp_path: Path
) -> None:
    rows, url_template = mpmath_set
    loaded = mpmath_tasks(rows, url_template, swebench_rootfs, tmp_path)
    async with SandboxEnvironmentService(env_config(tmp_path, 2)) as env:
        checks = await validate_tasks(env, loaded, concurrency=2)
    assert [c.task_id for c in checks] == [r["instance_id"] for r in rows]
    for check, row in zip(checks, rows, strict=True):
        assert check.problems == [], check.task_id
        assert (check.gold_reward, check.unpatched_reward) == (1.0, 0.0)
        f2p = json.loads(row["FAIL_TO_PASS"])
        unpatched = {t.test_id: t.status for t in check.unpatched_tests}
        assert {unpatched[t] for t in f2p} == {"failed"}
        assert {t.status for t in check.gold_tests} == {"passed"}
        assert len(check.gold_tests) == len(f2p) + len(json.loads(row["PASS_TO_PASS"]))


def gold_agent(gold: dict[str, str]) -> ScriptedBackend:
    """A model that applies each task's gold patch, then submits (no patch: submits)."""

    def script(task_id: str, index: int) -> common_pb2.ChatMessage:
        patch = gold.get(task_id)
        if index == 0 and patch:
            encoded = base64.b64encode(patch.encode()).decode()
            command = f"echo {encoded} | base64 -d > /tmp/fix.patch && git apply /tmp/fix.patch"
            return tool_call("bash", command=command)
        return tool_call("submit")

    return ScriptedBackend(script)


async def run_agent(
    tasks: list[common_pb2.TaskSpec], model: ScriptedBackend, tmp_path: Path
) -> dict[str, common_pb2.TaskResult]:
    results: dict[str, common_pb2.TaskResult] = {}

    def on_event(event: scheduler_pb2.TaskEvent, _: object) -> None:
        if event.HasField("result") and event.result.task_id:
            results[event.result.task_id] = event.result

    system = EmbeddedSystem(
        backends=[model],
        ledger_path=tmp_path / "ledger.sqlite",
        env_config=env_config(tmp_path, len(tasks)),
        agent_limits=AgentLimits(max_steps=4, setup_timeout_s=120.0, scoring_timeout_s=180.0),
        policy=SchedulerPolicy(default_max_attempts=1),
    )
    async with system:
        summary = await run_batch(
            system.scheduler, tasks, tmp_path / "out", max_concurrency=2, on_event=on_event
        )
    assert summary.finished == len(tasks)
    return results


async def test_agent_with_gold_patch_scores_one_and_unpatched_zero(
    mpmath_set: tuple[list[dict[str, Any]], str], swebench_rootfs: Path, tmp_path: Path
) -> None:
    rows, url_template = mpmath_set
    loaded = mpmath_tasks(rows, url_template, swebench_rootfs, tmp_path)
    solved, unsolved = loaded.tasks[0], loaded.tasks[1]
    gold = {solved.task_id: loaded.gold[solved.task_id].patch}
    results = await run_agent([solved, unsolved], gold_agent(gold), tmp_path)

    good = results[solved.task_id]
    assert (good.state, good.has_reward, good.reward) == (
        common_pb2.TASK_STATE_SUCCEEDED,
        True,
        1.0,
    ), good.error
    outcomes = {t.test_id: (t.group, t.status) for t in good.tests}
    f2p = json.loads(rows[0]["FAIL_TO_PASS"])
    assert {outcomes[t] for t in f2p} == {("FAIL_TO_PASS", "passed")}
    assert len(outcomes) == len(f2p) + len(json.loads(rows[0]["PASS_TO_PASS"]))

    bad = results[unsolved.task_id]
    assert (bad.has_reward, bad.reward) == (True, 0.0), bad.error
    failed = {t.test_id for t in bad.tests if t.status == "failed"}
    assert failed == set(json.loads(rows[1]["FAIL_TO_PASS"]))
