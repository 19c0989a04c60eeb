"""Harbor / Terminal-bench task directories as MegaFlow tasks.

A task is a directory (a set is a directory of them)::

    my-task/
      task.toml          [verifier] timeout_sec, [agent] timeout_sec,
                         [environment] docker_image (or the source's ``image``)
      instruction.md     what the agent is asked
      environment/       Dockerfile and its build context
      tests/test.sh      the verifier: writes the reward to /logs/verifier/reward.txt
      solution/solve.sh  optional reference solution (``megaflow validate`` runs it)

MegaFlow does not build Dockerfiles: the image is ``[environment] docker_image`` or the
source's ``image`` (e.g. a ``dir:`` rootfs for the local backend). The build context's
other files start the workspace, as the usual ``COPY . /app`` does. After the agent
submits, ``tests/`` is copied in and ``test.sh`` runs; the number it wrote to
``/logs/verifier/reward.txt`` is the reward (`megaflow.env.evaluation`).

Where the image's root is read-only (the local bubblewrap sandbox: only /workspace and
/tmp are writable), ``/tests`` and ``/logs/verifier`` cannot be made: the scripts then
run from a copy in the workspace with those two absolute paths rewritten to it (and
``$TEST_DIR`` set), which the evaluation's output says.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megaflow.env.evaluation.spec import SPEC_PATH, EvalSpec
from megaflow.tasks.rows import RowError
from megaflow.tasks.sources import GoldSolution, LoadedTasks, row_error
from megaflow.v1 import common_pb2

FAMILY = "harbor"
HARBOR_DIR = ".megaflow/harbor"
TESTS_DIR = f"{HARBOR_DIR}/tests"
REWARD_PATH = f"{HARBOR_DIR}/reward.txt"
RUN_PATH = f"{HARBOR_DIR}/run.sh"
SKIPPED_CONTEXT = ("Dockerfile", "docker-compose.yaml", "docker-compose.yml", ".dockerignore")

RUN_SCRIPT = f"""\
# MegaFlow: run a Harbor task's verifier (tests/test.sh); the reward goes to {REWARD_PATH}.
W=$(pwd); T=$W/{TESTS_DIR}
if mkdir -p /logs/verifier /tests 2>/dev/null && touch /logs/verifier/.w 2>/dev/null; then
  cp -R "$T/." /tests/ && TEST_DIR=/tests bash /tests/test.sh
  cp /logs/verifier/reward.txt "$W/{REWARD_PATH}" 2>/dev/null
else
  echo "megaflow: read-only root; tests/ run from $T, /tests and /logs/verifier mapped there"
  L=$W/{HARBOR_DIR}/logs/verifier; mkdir -p "$L"
  for f in $(find "$T" -type f); do
    sed -E -i "s#(^|[^A-Za-z0-9_./-])/logs/verifier#\\\\1$L#g; \
s#(^|[^A-Za-z0-9_./-])/tests(/|[[:space:]\\"']|\\$)#\\\\1$T\\\\2#g" "$f"
  done
  TEST_DIR=$T bash "$T/test.sh"
  cp "$L/reward.txt" "$W/{REWARD_PATH}" 2>/dev/null
fi
exit 0
"""


class HarborToml(BaseModel):
    """The parts of task.toml MegaFlow uses (the rest is kept as metadata)."""

    model_config = ConfigDict(extra="allow")

    class Timeouts(BaseModel):
        model_config = ConfigDict(extra="allow")
        timeout_sec: float = Field(default=0.0, ge=0)

    class Environment(BaseModel):
        model_config = ConfigDict(extra="allow")
        docker_image: str = ""

    verifier: Timeouts = Field(default_factory=Timeouts)
    agent: Timeouts = Field(default_factory=Timeouts)
    environment: Environment = Field(default_factory=Environment)
    metadata: dict[str, Any] = Field(default_factory=dict)


class HarborSource:
    """A Harbor task directory, or a directory of them."""

    class Config(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        path: str = Field(min_length=1, description="A task directory or a set of them.")
        image: str = Field(default="", description="Image of every task (over task.toml's).")
        max_steps: int = Field(default=50, ge=1, description="The agent's step budget.")

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> LoadedTasks:
        root = Path(self.config.path)
        dirs = (
            [root]
            if (root / "task.toml").is_file()
            else sorted(p.parent for p in root.glob("*/task.toml"))
        )
        out = LoadedTasks()
        for number, folder in enumerate(dirs, start=1):
            try:
                task, gold = self._task(folder)
            except ValidationError as exc:
                out.errors.append(row_error(f"{folder}/task.toml", number, exc))
                continue
            except _Bad as bad:
                out.errors.append(
                    RowError(source=str(folder), row=number, field=bad.field, message=bad.why)
                )
                continue
            out.tasks.append(task)
            if gold is not None:
                out.gold[task.task_id] = gold
        return out

    def _task(self, folder: Path) -> tuple[common_pb2.TaskSpec, GoldSolution | None]:
        try:
            raw = tomllib.loads((folder / "task.toml").read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise _Bad("task.toml", f"cannot read it: {exc}") from None
        toml = HarborToml.model_validate(raw)
        instruction = _text(folder / "instruction.md", "instruction.md")
        if not instruction.strip():
            raise _Bad("instruction.md", "is empty")
        if not (folder / "tests/test.sh").is_file():
            raise _Bad("tests/test.sh", "missing: the verifier that writes the reward")
        image = self.config.image or toml.environment.docker_image
        if not image:
            raise _Bad(
                "environment.docker_image",
                "no image: MegaFlow does not build Dockerfiles; set [environment] "
                "docker_image in task.toml or the source's image",
            )
        hidden = {
            f"{TESTS_DIR}/{p.relative_to(folder / 'tests')}": p.read_bytes()
            for p in sorted((folder / "tests").rglob("*"))
            if p.is_file()
        }
        hidden[RUN_PATH] = RUN_SCRIPT.encode()
        hidden[SPEC_PATH] = EvalSpec(reward_path=REWARD_PATH).model_dump_json().encode()
        context = folder / "environment"
        files = (
            {
                str(p.relative_to(context)): p.read_bytes()
                for p in sorted(context.rglob("*"))
                if p.is_file() and p.name not in SKIPPED_CONTEXT
            }
            if context.is_dir()
            else {}
        )
        budgets = common_pb2.TaskBudgets(
            max_steps=self.config.max_steps,
            scoring_timeout_s=toml.verifier.timeout_sec,
            task_timeout_s=toml.agent.timeout_sec,
        )
        task = common_pb2.TaskSpec(
            task_id=folder.name,
            family=FAMILY,
            problem_statement=instruction,
            image=image,
            files=files,
            hidden_files=hidden,
            eval_command=f"sh {RUN_PATH}",
            budgets=budgets,
            metadata={"source": str(folder)}
            | {k: str(v) for k, v in toml.metadata.items() if isinstance(v, (str, int, float))},
        )
        solve = folder / "solution/solve.sh"
        gold = GoldSolution(script=_text(solve, "solution/solve.sh")) if solve.is_file() else None
        return task, gold


class _Bad(Exception):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


def _text(path: Path, field: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise _Bad(field, "missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Bad(field, f"cannot read it: {exc}") from None
