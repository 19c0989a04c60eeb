"""MegaFlow's own row schema for task files (documented in docs/task-sources.md).

A row is a JSON object (a JSONL line, a Parquet or `datasets` row) mirroring the
useful fields of `TaskSpec`; text fields are text, so files stay readable::

    {"task_id": "hello-1", "problem_statement": "Make hello.py print hello.",
     "image": "host", "workspace": {"git": {"url": "/srv/repos/hello.git", "commit": "ab12..."}},
     "setup_commands": ["pip install -e ."],
     "hidden_files": {"check.sh": "python3 hello.py | grep -qx hello"},
     "eval_command": "sh check.sh", "max_steps": 20, "metadata": {"source": "demo"}}

``files`` (small inline files, path -> text) is allowed for tiny tasks; real
repositories travel by ``workspace`` reference.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from megaflow.v1 import common_pb2


class GitWorkspace(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(min_length=1, description="Anything `git clone` takes.")
    commit: str = Field(default="", description="Checked out; '' = the default branch.")


class WorkspaceRef(BaseModel):
    """Exactly one of ``git`` and ``artifact``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    git: GitWorkspace | None = None
    artifact: str = Field(default="", pattern=r"^(|sha256:[0-9a-f]{64})$")

    @model_validator(mode="after")
    def _one(self) -> WorkspaceRef:
        if (self.git is None) == (not self.artifact):
            raise ValueError("give exactly one of 'git' and 'artifact'")
        return self


class NativeTask(BaseModel):
    """One task in MegaFlow's native schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str = Field(min_length=1, description="Unique in the set.")
    problem_statement: str = Field(min_length=1, description="What the agent is asked.")
    family: str = Field(default="native", description="Groups tasks in reports.")
    image: str = Field(default="host", min_length=1, description="The sandbox image.")
    workspace: WorkspaceRef | None = Field(default=None, description="The repository.")
    files: dict[str, str] = Field(default_factory=dict, description="Small inline files.")
    setup_commands: list[str] = Field(default_factory=list, description="Run before the agent.")
    hidden_files: dict[str, str] = Field(
        default_factory=dict, description="Copied in after the agent submits."
    )
    eval_command: str = Field(default="", description="Exit status 0 = reward 1.")
    max_steps: int = Field(default=0, ge=0, description="Step budget; 0 = the default.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Where it came from.")

    def to_task(self) -> common_pb2.TaskSpec:
        task = common_pb2.TaskSpec(
            task_id=self.task_id,
            family=self.family,
            problem_statement=self.problem_statement,
            image=self.image,
            files={p: c.encode() for p, c in self.files.items()},
            setup_commands=self.setup_commands,
            hidden_files={p: c.encode() for p, c in self.hidden_files.items()},
            eval_command=self.eval_command,
            metadata=self.metadata,
            budgets=common_pb2.TaskBudgets(max_steps=self.max_steps),
        )
        if self.workspace is not None and self.workspace.git is not None:
            task.workspace.git.url = self.workspace.git.url
            task.workspace.git.commit = self.workspace.git.commit
        elif self.workspace is not None:
            task.workspace.artifact = self.workspace.artifact
        return task
