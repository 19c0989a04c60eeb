"""Task sources: SWE-bench and native rows from JSONL, Parquet and `datasets` directories;
one error per bad row; the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.evaluation.spec import SPEC_PATH, read_spec
from megaflow.tasks.sources import (
    TASK_SOURCES,
    FileSource,
    LoadedTasks,
    load_tasks,
    open_source,
)
from megaflow.v1 import common_pb2

SPECS = {
    "git_url_template": "file:///srv/{repo}.git",
    "specs": {
        "mpmath/mpmath": {
            "1.3": {"install": ["python3 -c 'import mpmath'"], "test_cmd": "python3 -m pytest -rA"}
        }
    },
}


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _write_datasets(path: Path, rows: list[dict[str, Any]]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_swebench_rows_become_tasks_by_reference(
    mpmath_set: tuple[list[dict[str, Any]], str], tmp_path: Path
) -> None:
    rows, _ = mpmath_set
    loaded = load_tasks(_write_jsonl(tmp_path / "set.jsonl", rows), SPECS)
    assert loaded.errors == []
    assert [t.task_id for t in loaded.tasks] == [r["instance_id"] for r in rows]
    task, row = loaded.tasks[0], rows[0]
    assert task.workspace.git.url == "file:///srv/mpmath/mpmath.git"
    assert task.workspace.git.commit == row["base_commit"]
    assert not task.files  # the repository travels by reference only
    assert list(task.setup_commands) == ["python3 -c 'import mpmath'"]
    assert task.image == "swebench/sweb.eval.x86_64.mpmath_1776_mpmath-1001:latest"
    assert task.metadata["repo"] == "mpmath/mpmath" and task.metadata["version"] == "1.3"
    spec = read_spec(dict(task.hidden_files))
    assert spec is not None
    assert spec.test_command == ("python3", "-m", "pytest", "-rA")
    f2p = json.loads(row["FAIL_TO_PASS"])
    assert [t.test_id for t in spec.tests if t.group == "FAIL_TO_PASS"] == f2p
    assert "it's [2**100]" in f2p[-1]  # the id kept exactly, quotes and brackets too
    assert loaded.gold[task.task_id].patch == row["patch"]
    assert row["patch"] not in task.SerializeToString().decode(errors="replace")


def test_same_set_from_jsonl_parquet_and_datasets(
    mpmath_set: tuple[list[dict[str, Any]], str], tmp_path: Path
) -> None:
    rows, _ = mpmath_set
    as_lists = [dict(r, PASS_TO_PASS=json.loads(r["PASS_TO_PASS"])) for r in rows]
    as_lists[0]["image"] = None  # a column some rows lack reads as null: the default applies
    pq.write_table(pa.Table.from_pylist(as_lists), tmp_path / "set.parquet")
    sets = [
        load_tasks(_write_jsonl(tmp_path / "set.jsonl", rows)),
        load_tasks(tmp_path / "set.parquet"),
        load_tasks(_write_datasets(tmp_path / "set-ds", rows)),
    ]
    assert all(s.errors == [] for s in sets)
    first = [t.SerializeToString(deterministic=True) for t in sets[0].tasks]
    assert len(first) == len(rows)
    for other in sets[1:]:
        assert [t.SerializeToString(deterministic=True) for t in other.tasks] == first


def test_each_bad_row_is_one_error_and_the_rest_load(
    mpmath_set: tuple[list[dict[str, Any]], str], tmp_path: Path
) -> None:
    rows, _ = mpmath_set
    good = rows[0]
    no_commit = {k: v for k, v in rows[1].items() if k != "base_commit"}
    bad_tests = dict(rows[2], instance_id="x__y-1", FAIL_TO_PASS="not json [")
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            good,
            no_commit,
            "{not json",
            bad_tests,
            ["a", "list"],
            {"name": "neither schema"},
            dict(good),  # the same instance again
            {"task_id": "native-1", "problem_statement": "Say hi.", "eval_command": "true"},
            {"task_id": "native-2", "problem_statement": "x", "max_steps": -1},
        ],
    )
    loaded = load_tasks(path)
    assert [t.task_id for t in loaded.tasks] == [good["instance_id"], "native-1"]
    found = {(e.row, e.field) for e in loaded.errors}
    assert found == {
        (2, "base_commit"),
        (3, ""),
        (4, "FAIL_TO_PASS"),
        (5, ""),
        (6, ""),
        (7, "instance_id"),
        (9, "max_steps"),
    }
    by_row = {e.row: str(e) for e in loaded.errors}
    assert "row 2: field 'base_commit': Field required" in by_row[2]
    assert "not valid JSON" in by_row[3]
    assert "not a JSON list of test ids" in by_row[4]
    assert "repeats row 1" in by_row[7]
    assert "greater than or equal to 0" in by_row[9]


def test_native_rows(tmp_path: Path) -> None:
    row = {
        "task_id": "hello",
        "problem_statement": "Make hello.py print hello.",
        "workspace": {"git": {"url": "/srv/hello.git", "commit": "ab12cd3"}},
        "setup_commands": ["true"],
        "hidden_files": {"check.sh": "python3 hello.py | grep -qx hello"},
        "eval_command": "sh check.sh",
        "max_steps": 7,
        "metadata": {"source": "demo"},
    }
    bad = dict(row, task_id="two", workspace={"git": {"url": "/a"}, "artifact": "sha256:00"})
    loaded = load_tasks(_write_jsonl(tmp_path / "native.jsonl", [row, bad]))
    (task,) = loaded.tasks
    assert task.workspace.git.url == "/srv/hello.git" and task.workspace.git.commit == "ab12cd3"
    assert task.hidden_files["check.sh"] == b"python3 hello.py | grep -qx hello"
    assert task.budgets.max_steps == 7 and task.metadata["source"] == "demo"
    (error,) = loaded.errors
    assert (error.row, error.field) == (2, "workspace.artifact")


def test_unreadable_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no task file"):
        load_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidRequestError, match=r"cannot read .* as Parquet"):
        load_tasks(tmp_path / "broken.parquet")
    with pytest.raises(InvalidRequestError, match="bad task source 'file' config"):
        load_tasks(tmp_path / "missing.jsonl", {"no_such_option": 1})


class EchoSource:
    """A task source from outside MegaFlow (found by dotted path)."""

    from pydantic import BaseModel

    class Config(BaseModel):
        word: str = "hi"

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> LoadedTasks:
        return LoadedTasks(tasks=[common_pb2.TaskSpec(task_id=self.config.word)])


def test_registry_built_ins_and_dotted_paths() -> None:
    assert {"synthetic", "file", "harbor"} <= set(TASK_SOURCES.names())
    assert TASK_SOURCES.get("file") is FileSource
    synthetic = open_source("synthetic", {"n": 3, "seed": 2}).load()
    assert [t.task_id for t in synthetic.tasks] == [f"swe-synth-2-{i:05d}" for i in range(3)]
    echoed = open_source(f"{__name__}:EchoSource", '{"word": "plug-in"}').load()
    assert [t.task_id for t in echoed.tasks] == ["plug-in"]
    with pytest.raises(InvalidRequestError, match="unknown task source"):
        open_source("nope")


def test_hidden_spec_is_only_in_hidden_files(mpmath_set: tuple[list[dict[str, Any]], str]) -> None:
    rows, _ = mpmath_set
    from megaflow.tasks.swebench import SweBenchRow

    task = SweBenchRow.model_validate(rows[1]).to_task()
    assert SPEC_PATH in task.hidden_files and SPEC_PATH not in task.files
    assert task.eval_command.startswith("python3 -I -B .megaflow/eval/run_tests.py")
