"""Validate a task set with its gold solutions and no model (as the SWE-bench harness
validates a data set): every task must score 1 with its gold solution applied and 0 as
it comes (otherwise its tests do not tell a fix from no fix).

For each task, two environments (the same create as an agent's: image, workspace,
setup commands, hidden files):

- *gold*: the gold ``patch`` is written into the workspace and ``git apply``-ed (a
  Harbor task's ``solution/solve.sh`` is run instead), then submitted: reward 1 expected;
- *unpatched*: submitted untouched: reward 0 expected.

A task is broken when either differs, when it has no gold solution, or when its
environment cannot be made; `TaskCheck.problems` says which, with the failing tests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from megaflow.contract import EnvironmentService
from megaflow.contract.requests import environment_request
from megaflow.core.errors import MegaFlowError
from megaflow.tasks.sources import GoldSolution, LoadedTasks
from megaflow.v1 import common_pb2, env_pb2

GOLD_PATH = ".megaflow/gold/solution"
APPLY_PATCH = (
    f"git -c safe.directory='*' apply -v {GOLD_PATH} || patch -p1 < {GOLD_PATH}; "
    f"s=$?; rm -rf .megaflow/gold; exit $s"
)
RUN_SCRIPT = f"bash {GOLD_PATH}; s=$?; rm -rf .megaflow/gold; exit $s"


@dataclass
class TaskCheck:
    task_id: str
    gold_reward: float | None = None
    unpatched_reward: float | None = None
    gold_tests: list[common_pb2.TestOutcome] = field(default_factory=list)
    unpatched_tests: list[common_pb2.TestOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def validate_tasks(
    env: EnvironmentService,
    loaded: LoadedTasks,
    *,
    concurrency: int = 4,
    step_timeout_s: float = 600.0,
    setup_timeout_s: float = 600.0,
    scoring_timeout_s: float = 900.0,
) -> list[TaskCheck]:
    """One `TaskCheck` per task of ``loaded``, in order."""
    gate = asyncio.Semaphore(max(concurrency, 1))
    timeouts = (step_timeout_s, setup_timeout_s, scoring_timeout_s)

    async def one(task: common_pb2.TaskSpec) -> TaskCheck:
        async with gate:
            return await check_task(env, task, loaded.gold.get(task.task_id), *timeouts)

    return list(await asyncio.gather(*(one(t) for t in loaded.tasks)))


async def check_task(
    env: EnvironmentService,
    task: common_pb2.TaskSpec,
    gold: GoldSolution | None,
    step_timeout_s: float = 600.0,
    setup_timeout_s: float = 600.0,
    scoring_timeout_s: float = 900.0,
) -> TaskCheck:
    check = TaskCheck(task_id=task.task_id)
    if gold is None or not (gold.patch or gold.script):
        check.problems.append("no gold solution (a 'patch', or solution/solve.sh)")
    runs: list[tuple[str, GoldSolution | None]] = [("unpatched", None)]
    if not check.problems:
        runs.insert(0, ("gold", gold))
    for label, solution in runs:
        try:
            reply = await _attempt(
                env, task, solution, step_timeout_s, setup_timeout_s, scoring_timeout_s
            )
        except (MegaFlowError, OSError) as exc:
            check.problems.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        if not reply.has_reward:
            check.problems.append(f"{label}: not scored: {reply.message}")
            continue
        failing = [f"{t.test_id} ({t.status})" for t in reply.tests if t.status != "passed"]
        if label == "gold":
            check.gold_reward, check.gold_tests = reply.reward, list(reply.tests)
            if reply.reward != 1.0:
                detail = f"; failing: {', '.join(failing)}" if failing else ""
                check.problems.append(f"gold solution scores {reply.reward:g}, not 1{detail}")
        else:
            check.unpatched_reward, check.unpatched_tests = reply.reward, list(reply.tests)
            if reply.reward != 0.0:
                check.problems.append(
                    f"unpatched repository scores {reply.reward:g}, not 0 "
                    "(its tests do not catch the bug)"
                )
    return check


async def _attempt(
    env: EnvironmentService,
    task: common_pb2.TaskSpec,
    solution: GoldSolution | None,
    step_timeout_s: float,
    setup_timeout_s: float,
    scoring_timeout_s: float,
) -> env_pb2.SubmitActionResponse:
    created = await env.create_environment(
        environment_request(
            task,
            owner=f"validate-{task.task_id}",
            setup_timeout_s=task.budgets.setup_timeout_s or setup_timeout_s,
            lease_s=setup_timeout_s + step_timeout_s + scoring_timeout_s + 60.0,
        )
    )
    env_id = created.env_id
    try:
        if solution is not None:
            content = (solution.patch or solution.script).encode()
            await env.submit_action(
                env_pb2.SubmitActionRequest(
                    env_id=env_id, write_file=env_pb2.WriteFile(path=GOLD_PATH, content=content)
                )
            )
            command = APPLY_PATCH if solution.patch else RUN_SCRIPT
            ran = await env.execute_step(
                env_pb2.ExecuteStepRequest(env_id=env_id, command=command, timeout_s=step_timeout_s)
            )
            if ran.exit_code != 0:
                what = "the gold patch does not apply" if solution.patch else "solve.sh failed"
                raise _GoldFailed(f"{what} (exit {ran.exit_code}): {ran.output[-2000:]}")
        return await env.submit_action(
            env_pb2.SubmitActionRequest(
                env_id=env_id,
                submit=env_pb2.Submit(
                    scoring_timeout_s=task.budgets.scoring_timeout_s or scoring_timeout_s
                ),
            )
        )
    finally:
        await env.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


class _GoldFailed(MegaFlowError):
    """The gold solution could not be applied."""
