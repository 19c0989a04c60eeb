"""SWE-bench rows (the data set's own schema) as MegaFlow tasks.

A row names a repository and a commit; the task's workspace is that commit, cloned by
reference (``workspace.git``: the URL comes from `SweBenchConfig.git_url_template`),
never its files. A spec table keyed by (repo, version), as the SWE-bench harness's
``MAP_REPO_VERSION_TO_SPECS`` is, supplies the install commands (the task's
``setup_commands``), the test command and the log parser. Scoring has SWE-bench's
semantics (`megaflow.env.evaluation`): after the agent submits, the test files go back
to ``base_commit``, ``test_patch`` is applied, exactly the ``FAIL_TO_PASS`` and
``PASS_TO_PASS`` tests run (their ids passed to the runner as argv, never through a
shell), and the reward is 1 only if every one passes. Each test's outcome is recorded.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megaflow.env.evaluation.spec import TestRef, tests_evaluation
from megaflow.v1 import common_pb2

FAMILY = "swe-bench"
FAIL_TO_PASS, PASS_TO_PASS = "FAIL_TO_PASS", "PASS_TO_PASS"


class RepoSpec(BaseModel):
    """How one (repo, version) installs and runs its tests (the harness's specs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    install: tuple[str, ...] = Field(
        default=(), description="Shell commands run in the workspace before the agent starts."
    )
    test_cmd: str = Field(
        default="python3 -m pytest -rA --tb=short -p no:cacheprovider",
        min_length=1,
        description="The test runner without test ids (ids are appended as argv).",
    )
    log_parser: str = Field(default="pytest", description="Parser of the runner's log.")


class SweBenchConfig(BaseModel):
    """How SWE-bench rows become tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    git_url_template: str = Field(
        default="https://github.com/{repo}.git",
        description="The clone URL of a row's repository; {repo} is its 'owner/name'.",
    )
    image_template: str = Field(
        default="swebench/sweb.eval.x86_64.{instance_key}:latest",
        description="The image of a row without one; {instance_id}, {instance_key} "
        "(the id lower-cased, '__' as '_1776_', as SWE-bench's image names), {repo}, {version}.",
    )
    specs: dict[str, dict[str, RepoSpec]] = Field(
        default_factory=dict, description="repo -> version -> RepoSpec ('*': any version)."
    )
    default_spec: RepoSpec = Field(
        default_factory=RepoSpec, description="For a (repo, version) the table lacks."
    )
    max_steps: int = Field(default=50, ge=1, description="The agent's step budget per task.")

    def spec_for(self, repo: str, version: str) -> RepoSpec:
        by_version = self.specs.get(repo, {})
        return by_version.get(version) or by_version.get("*") or self.default_spec


def _test_list(value: Any) -> Any:
    """FAIL_TO_PASS / PASS_TO_PASS: a JSON-encoded list (as in the data set) or a list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("not a JSON list of test ids") from None
    if hasattr(value, "tolist"):  # a numpy array (pandas-written Parquet)
        value = value.tolist()
    return value


class SweBenchRow(BaseModel):
    """One instance in the SWE-bench schema (extra columns are kept as metadata)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    instance_id: str = Field(min_length=1)
    repo: str = Field(min_length=1, pattern=r"^[^/\s]+/[^/\s]+$")
    base_commit: str = Field(min_length=1, pattern=r"^[0-9a-fA-F]{7,40}$")
    problem_statement: str = Field(min_length=1)
    patch: str = ""
    test_patch: str = ""
    FAIL_TO_PASS: list[str] = Field(min_length=1)
    PASS_TO_PASS: list[str] = Field(default_factory=list)
    version: str = ""
    environment_setup_commit: str = ""
    image: str = ""
    hints_text: str = ""
    created_at: str = ""

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _test_list(value)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        if any(not t for t in value):
            raise ValueError("a test id is empty")
        return value

    def to_task(self, config: SweBenchConfig | None = None) -> common_pb2.TaskSpec:
        """The MegaFlow task of this instance."""
        config = config or SweBenchConfig()
        spec = config.spec_for(self.repo, self.version)
        tests = [TestRef(test_id=t, group=FAIL_TO_PASS) for t in self.FAIL_TO_PASS] + [
            TestRef(test_id=t, group=PASS_TO_PASS) for t in self.PASS_TO_PASS
        ]
        hidden, eval_command = tests_evaluation(
            test_command=spec.test_cmd,
            tests=tests,
            test_patch=self.test_patch,
            base_commit=self.base_commit,
            log_parser=spec.log_parser,
        )
        fields = dict(
            instance_id=self.instance_id,
            instance_key=self.instance_id.lower().replace("__", "_1776_"),
            repo=self.repo,
            version=self.version,
        )
        metadata = {
            "instance_id": self.instance_id,
            "repo": self.repo,
            "base_commit": self.base_commit,
            "version": self.version,
            "environment_setup_commit": self.environment_setup_commit,
        }
        metadata.update({k: str(v) for k, v in (self.model_extra or {}).items() if v is not None})
        task = common_pb2.TaskSpec(
            task_id=self.instance_id,
            family=FAMILY,
            problem_statement=self.problem_statement,
            image=self.image or config.image_template.format(**fields),
            hidden_files=hidden,
            eval_command=eval_command,
            setup_commands=list(spec.install),
            metadata={k: v for k, v in metadata.items() if v},
            budgets=common_pb2.TaskBudgets(max_steps=config.max_steps),
        )
        task.workspace.git.url = config.git_url_template.format(repo=self.repo)
        task.workspace.git.commit = self.base_commit
        return task
