"""Hostile actions against scoring: an agent that did not fix the task must not get a
reward. `SubmitAction(submit)` copies the hidden tests in and runs the evaluation in
the same sandbox, so what the agent left behind (shell state, workspace files) must
not decide the result."""

from __future__ import annotations

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.v1 import common_pb2, env_pb2
from tests.security.conftest import Arena

pytestmark = pytest.mark.integration

SHELL_STATE_HOLE = (
    "HOLE (reward integrity): the evaluation runs in the agent's persistent shell, so its "
    "functions, aliases and exported variables apply: `python3() { return 0; }` scores "
    "1.0 without a fix. Fix in src/megaflow/env/actions.py `evaluate`: score in a fresh "
    "shell with a clean environment (restart the shell first, as backends.reset does, and "
    "run `env -i PATH=... HOME=/workspace bash --noprofile --norc -c 'cd /workspace && "
    "<eval>'`)."
)
WORKSPACE_HOLE = (
    "HOLE (reward integrity): the evaluation imports code the agent controls: a "
    "workspace `unittest.py` shadows the stdlib (cwd is first on sys.path for -m) and an "
    "extra `tests/test_hidden_x.py` matches the discovery pattern; either can "
    "`os._exit(0)` before the hidden tests run. Fix in src/megaflow/tasks/swe_synth.py "
    "(eval_command): `python3 -P -m unittest` naming the hidden test modules explicitly, "
    "and accept only a run whose report shows the expected number of tests, all passed "
    "(e.g. `... 2>&1 | tee /tmp/r; grep -q '^Ran N tests' /tmp/r`)."
)


def _task() -> common_pb2.TaskSpec:
    return generate_tasks(1, seed=11)[0]


async def _score_after(arena: Arena, command: str) -> env_pb2.SubmitActionResponse:
    task = _task()
    arena.attacker = (
        await arena.service.create_environment(
            arena.request(
                owner="attacker",
                files=task.files,
                hidden_files=task.hidden_files,
                eval_command=task.eval_command,
            )
        )
    ).env_id
    r = await arena.step(command)
    assert r.exit_code == 0, r.output
    reply = await arena.act(submit=env_pb2.Submit())
    assert reply.has_reward, reply.message
    return reply


async def test_unfixed_task_scores_zero(arena: Arena) -> None:
    """The control: without a fix and without tricks, the hidden tests fail."""
    reply = await _score_after(arena, "true")
    assert reply.reward == 0.0
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "python3() { return 0; }",
        "shopt -s expand_aliases; alias python3=true",
        "mkdir -p /tmp/sp && echo 'import os; os._exit(0)' > /tmp/sp/sitecustomize.py && "
        "export PYTHONPATH=/tmp/sp",
    ],
    ids=["shell_function", "alias", "exported_pythonpath"],
)
async def test_shell_state_decides_reward(arena: Arena, command: str) -> None:
    reply = await _score_after(arena, command)
    assert reply.reward == 0.0, "an unfixed task was rewarded"
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "echo 'import os; os._exit(0)' > unittest.py",
        "echo 'import os; os._exit(0)' > tests/test_hidden_zzz.py",
    ],
    ids=["shadow_stdlib_unittest", "extra_hidden_pattern_test"],
)
async def test_workspace_code_decides_reward(arena: Arena, command: str) -> None:
    reply = await _score_after(arena, command)
    assert reply.reward == 0.0, "an unfixed task was rewarded"
    await arena.assert_contained()


async def test_read_only_hidden_test_path(arena: Arena) -> None:
    # A fake hidden test the evaluation cannot overwrite: scoring fails loudly instead.
    task = _task()
    hidden = next(p for p in task.hidden_files if p.startswith("tests/test_hidden_"))
    command = f"echo 'import unittest' > {hidden} && chmod 444 {hidden} && chmod 555 tests"
    with pytest.raises(InvalidRequestError, match="Permission denied"):
        await _score_after(arena, command)
    await arena.assert_contained()
