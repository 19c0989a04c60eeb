"""Evaluations that report more than an exit status: per-test outcomes, or a reward file.

A task opts in by carrying an `EvalSpec` as the hidden file `SPEC_PATH` (JSON). Then
`megaflow.env.actions.evaluate`, after running the task's ``eval_command``:

- ``tests`` given: reads the test log at ``log_path`` from the workspace, parses it
  with the log parser named ``log_parser`` (`megaflow.env.evaluation.log_parsers`),
  and records one `TestOutcome` per test; the reward is 1 only if every test passed
  (SWE-bench's rule: all of FAIL_TO_PASS and PASS_TO_PASS);
- ``reward_path`` given (Harbor tasks): the reward is the number in that file.

The spec comes from the task (the hidden files), never from the workspace: the agent
cannot change which tests count. The outputs (`EvalSpec.outputs`) are emptied before
the evaluation runs, so nothing the agent left there is read as a result. A task with
no spec is scored by the exit status of ``eval_command``, as before.

The task sources (`megaflow.tasks.swebench`, `megaflow.tasks.harbor`) write the spec;
the Environment Service reads it, so it lives here, below both.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from megaflow.env.evaluation.log_parsers import LOG_PARSERS, MISSING, PASSED
from megaflow.v1 import common_pb2

EVAL_DIR = ".megaflow/eval"
SPEC_PATH = f"{EVAL_DIR}/spec.json"
RUNNER_PATH = f"{EVAL_DIR}/run_tests.py"
TEST_PATCH_PATH = f"{EVAL_DIR}/test.patch"
LOG_PATH = f"{EVAL_DIR}/test_output.log"
RUN_TESTS_COMMAND = f"python3 -I -B {RUNNER_PATH} {SPEC_PATH}"


class TestRef(BaseModel):
    """One test the evaluation runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    __test__ = False  # not a pytest class

    test_id: str = Field(min_length=1, description="Exactly as the test runner names it.")
    group: str = Field(default="", description="e.g. FAIL_TO_PASS or PASS_TO_PASS.")


class EvalSpec(BaseModel):
    """What the evaluation runs and where its results are (hidden file `SPEC_PATH`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tests: tuple[TestRef, ...] = Field(default=(), description="Tests whose outcomes count.")
    test_command: tuple[str, ...] = Field(
        default=(), description="argv of the test runner; the test ids are appended."
    )
    log_parser: str = Field(default="pytest", description="Log parser of the test runner.")
    log_path: str = Field(default=LOG_PATH, description="Workspace path of the test log.")
    test_patch_path: str = Field(default="", description="A diff applied before the tests.")
    base_commit: str = Field(default="", description="Test files are reset to it first.")
    reward_path: str = Field(
        default="", description="Workspace path of a file holding the reward (a number)."
    )

    def outputs(self) -> list[str]:
        """Workspace paths the evaluation writes (emptied before it runs)."""
        return [p for p in (self.log_path if self.tests else "", self.reward_path) if p]

    def score(self, outputs: dict[str, bytes | None]) -> tuple[float, list[common_pb2.TestOutcome]]:
        """(reward, per-test outcomes) from the files the evaluation wrote (None: absent)."""
        if self.reward_path:
            return _reward_from_file(outputs.get(self.reward_path)), []
        raw = outputs.get(self.log_path) or b""
        statuses = LOG_PARSERS.get(self.log_parser)(
            raw.decode(errors="replace"), [t.test_id for t in self.tests]
        )
        outcomes = [
            common_pb2.TestOutcome(
                test_id=t.test_id, status=statuses.get(t.test_id, MISSING), group=t.group
            )
            for t in self.tests
        ]
        passed = bool(outcomes) and all(o.status == PASSED for o in outcomes)
        return (1.0 if passed else 0.0), outcomes


def _reward_from_file(raw: bytes | None) -> float:
    """The number in a reward file; 0 when it is absent, empty or not a finite number."""
    try:
        value = float((raw or b"").decode().strip())
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


@cache
def runner_source() -> bytes:
    return (Path(__file__).parent / "runner.py").read_bytes()


def tests_evaluation(
    *,
    test_command: str | Sequence[str],
    tests: Sequence[TestRef],
    test_patch: str = "",
    base_commit: str = "",
    log_parser: str = "pytest",
) -> tuple[dict[str, bytes], str]:
    """(hidden files, eval_command) that apply ``test_patch`` and run exactly ``tests``.

    ``test_command`` is the runner without test ids (a string is split as a shell would:
    it is the spec table's command, e.g. ``"pytest -rA"``; the ids never are)."""
    argv = shlex.split(test_command) if isinstance(test_command, str) else list(test_command)
    spec = EvalSpec(
        tests=tuple(tests),
        test_command=tuple(argv),
        log_parser=log_parser,
        test_patch_path=TEST_PATCH_PATH if test_patch else "",
        base_commit=base_commit,
    )
    LOG_PARSERS.get(log_parser)  # unknown parsers fail at load time, not at scoring
    hidden = {SPEC_PATH: spec.model_dump_json().encode(), RUNNER_PATH: runner_source()}
    if test_patch:
        hidden[TEST_PATCH_PATH] = test_patch.encode()
    return hidden, RUN_TESTS_COMMAND


def read_spec(hidden_files: dict[str, bytes]) -> EvalSpec | None:
    """The task's `EvalSpec`, or None for an exit-status evaluation."""
    raw = hidden_files.get(SPEC_PATH)
    return EvalSpec.model_validate(json.loads(raw)) if raw is not None else None
