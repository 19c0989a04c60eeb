"""Task sources: where a run's tasks come from, found through a registry (plug-ins).

    loaded = load_tasks("swe-bench-lite.parquet")      # auto-detected
    loaded = open_source("synthetic", {"n": 8}).load()  # by name, with a config
    for error in loaded.errors: print(error)            # one per bad row
    run(loaded.tasks)

A source is a class with a pydantic ``Config`` whose ``load()`` returns `LoadedTasks`:
the good tasks, one `RowError` per bad row (row, field, why: a bad row never sinks the
rest), and each task's gold solution where the set has one (for ``megaflow validate``;
never inside the task the agent gets). Built-ins:

- ``synthetic``: `megaflow.tasks.swe_synth` (n, seed);
- ``file``: a JSONL / Parquet / ``datasets`` file of SWE-bench rows (`SweBenchRow`) or
  native rows (`NativeTask`), told apart per row (``instance_id`` or ``task_id``);
- ``harbor``: Harbor / Terminal-bench task directories (`megaflow.tasks.harbor`).

Others register under the entry-point group ``megaflow.task_sources`` (or are named by
a dotted path), as scaffolds and sandbox backends do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megaflow.core.errors import InvalidRequestError
from megaflow.core.registry import Registry, parse_config
from megaflow.tasks.native import NativeTask
from megaflow.tasks.rows import RowError, read_rows
from megaflow.tasks.swebench import SweBenchConfig, SweBenchRow
from megaflow.v1 import common_pb2


@dataclass(frozen=True)
class GoldSolution:
    """What solves a task, for validating a set: a diff to apply or a script to run."""

    patch: str = ""
    script: str = ""


@dataclass
class LoadedTasks:
    tasks: list[common_pb2.TaskSpec] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    gold: dict[str, GoldSolution] = field(default_factory=dict)


class TaskSource(Protocol):
    Config: ClassVar[type[BaseModel]]

    def load(self) -> LoadedTasks: ...


# Values are TaskSource classes (a Protocol with a nested Config: mypy cannot type them).
TASK_SOURCES: Registry[Any] = Registry(
    "megaflow.task_sources", "task source", check=lambda c: hasattr(c, "Config")
)


def open_source(name: str, settings: str | Mapping[str, Any] | None = None) -> TaskSource:
    """The task source ``name`` configured by ``settings`` (JSON text or a mapping)."""
    cls = TASK_SOURCES.get(name)
    source: TaskSource = cls(parse_config(cls.Config, settings, f"task source {name!r}"))
    return source


def load_tasks(path: str | Path, settings: str | Mapping[str, Any] | None = None) -> LoadedTasks:
    """The tasks at ``path``: Harbor task directories, or a task file of rows."""
    p = Path(path)
    data = dict(parse_config(_AnySettings, settings, "task source").model_extra or {})
    data["path"] = str(p)
    if p.is_dir() and _is_harbor(p):
        return open_source("harbor", data).load()
    return open_source("file", data).load()


class _AnySettings(BaseModel):
    model_config = ConfigDict(extra="allow")


def _is_harbor(path: Path) -> bool:
    return (path / "task.toml").is_file() or any(path.glob("*/task.toml"))


def row_error(source: str, row: int, exc: ValidationError) -> RowError:
    """One error for one bad row: the first bad field, and every problem of the row."""
    problems = exc.errors()
    fields = [".".join(map(str, e["loc"])) for e in problems]
    message = "; ".join(
        f"{f}: {e['msg']}" if f and i else e["msg"]
        for i, (f, e) in enumerate(zip(fields, problems, strict=True))
    )
    return RowError(source=source, row=row, field=fields[0] if fields else "", message=message)


class FileSource:
    """Rows of a JSONL / Parquet / `datasets` file (SWE-bench or native schema)."""

    class Config(SweBenchConfig):
        path: str = Field(min_length=1, description="The task file or directory.")
        split: str = Field(default="", description="A DatasetDict's split.")

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> LoadedTasks:
        out = LoadedTasks()
        path = Path(self.config.path)
        seen: dict[str, int] = {}
        swebench = SweBenchConfig(
            **self.config.model_dump(include=set(SweBenchConfig.model_fields))
        )
        for number, row in read_rows(path, self.config.split):
            if isinstance(row, RowError):
                out.errors.append(row)
                continue
            try:
                task, gold = _row_task(row, swebench)
            except ValidationError as exc:
                out.errors.append(row_error(str(path), number, exc))
                continue
            except InvalidRequestError as exc:
                out.errors.append(
                    RowError(source=str(path), row=number, field="", message=str(exc))
                )
                continue
            key = "instance_id" if "instance_id" in row else "task_id"
            if task.task_id in seen:
                out.errors.append(
                    RowError(
                        source=str(path),
                        row=number,
                        field=key,
                        message=f"{task.task_id!r} repeats row {seen[task.task_id]}",
                    )
                )
                continue
            seen[task.task_id] = number
            out.tasks.append(task)
            if gold is not None:
                out.gold[task.task_id] = gold
        return out


def _row_task(
    row: dict[str, Any], config: SweBenchConfig
) -> tuple[common_pb2.TaskSpec, GoldSolution | None]:
    # A column missing from some rows of a table reads as null there: the field's default.
    row = {key: value for key, value in row.items() if value is not None}
    if "instance_id" in row:
        swe = SweBenchRow.model_validate(row)
        return swe.to_task(config), GoldSolution(patch=swe.patch) if swe.patch else None
    if "task_id" in row:
        return NativeTask.model_validate(row).to_task(), None
    raise InvalidRequestError(
        "neither a SWE-bench row (no 'instance_id') nor a native one (no 'task_id')"
    )


class SyntheticSource:
    """`megaflow.tasks.swe_synth`'s generated tasks."""

    class Config(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        n: int = Field(default=32, ge=0, description="How many tasks.")
        seed: int = Field(default=0, description="The generator's seed.")

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> LoadedTasks:
        from megaflow.tasks.swe_synth import generate_tasks

        return LoadedTasks(tasks=generate_tasks(self.config.n, seed=self.config.seed))


def _harbor() -> Any:
    from megaflow.tasks.harbor import HarborSource

    return HarborSource


TASK_SOURCES.add("synthetic", lambda: SyntheticSource)
TASK_SOURCES.add("file", lambda: FileSource)
TASK_SOURCES.add("harbor", _harbor)
