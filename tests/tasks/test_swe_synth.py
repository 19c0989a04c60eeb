"""`swe-synth` tasks: determinism, the catalogue, and the tests run for real with `python3`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.tasks.catalogue import BY_NAME, CATALOGUE, locate_bug
from megaflow.tasks.swe_synth import (
    FAMILY,
    RUNNER_PATH,
    generate_task,
    generate_tasks,
    parse_problem_statement,
    reference_patch,
    wrong_patch,
)
from megaflow.v1 import common_pb2

PYTHON = sys.executable  # the sandbox runs `python3`; see test_eval_command_as_shell
N_REAL = 20  # tasks run for real; more than the catalogue, so every entry is covered


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _unittest(root: Path, pattern: str) -> subprocess.CompletedProcess[str]:
    """`python3 -m unittest` as the sandbox runs it, from the repository root."""
    command = [PYTHON, "-m", "unittest", "discover", "-s", "tests", "-p", pattern]
    return subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=60, check=False
    )


def _ran(result: subprocess.CompletedProcess[str]) -> int:
    match = re.search(r"Ran (\d+) tests?", result.stderr)
    assert match, result.stderr
    return int(match.group(1))


def _named(task: common_pb2.TaskSpec) -> tuple[str, str]:
    parsed = parse_problem_statement(task.problem_statement)
    assert parsed is not None, task.problem_statement
    return parsed


def _patched(task: common_pb2.TaskSpec, patch: tuple[str, str, str]) -> dict[str, bytes]:
    path, old, new = patch
    files = dict(task.files)
    text = files[path].decode()
    assert text.count(old) == 1
    files[path] = text.replace(old, new).encode()
    return files


def test_deterministic_and_independent_of_n() -> None:
    a = generate_tasks(12, seed=7)
    b = generate_tasks(30, seed=7)
    assert [t.SerializeToString(deterministic=True) for t in a] == [
        t.SerializeToString(deterministic=True) for t in b[:12]
    ]
    assert generate_task(7, 25).SerializeToString(deterministic=True) == b[25].SerializeToString(
        deterministic=True
    )
    other = generate_tasks(12, seed=8)
    assert [t.files for t in a] != [t.files for t in other]
    assert len({t.task_id for t in b}) == 30


def test_fields() -> None:
    task = generate_tasks(1, seed=3)[0]
    assert task.task_id == "swe-synth-3-00000"
    assert task.family == FAMILY == "swe-synth"
    assert task.image == "host"
    assert f"{RUNNER_PATH} tests/test_hidden_" in task.eval_command and "-I" in task.eval_command
    assert task.budgets.max_steps == 20
    assert task.budgets.max_tokens == 0 and task.budgets.task_timeout_s == 0
    assert task.max_attempts == 0
    assert "README.md" in task.files
    assert all(p.startswith("tests/test_hidden_") or p == RUNNER_PATH for p in task.hidden_files)
    assert not set(task.hidden_files) & set(task.files)
    assert generate_tasks(0) == []
    with pytest.raises(InvalidRequestError):
        generate_tasks(-1)


def test_catalogue_lines_identify_their_function() -> None:
    assert len(CATALOGUE) >= 12
    owner: dict[str, str] = {}
    for template in CATALOGUE:
        for params in template.variants:
            lines = {template.line(w, params) for w in ("correct", "buggy", "decoy")}
            assert len(lines) == 3, template.name
            for line in lines:
                assert owner.setdefault(line, template.name) == template.name, line


def test_catalogue_behaviour() -> None:
    """Correct passes every case; buggy fails the quoted example as stated; decoy fails one."""
    for template in CATALOGUE:
        for params in template.variants:
            results = {}
            for which in ("correct", "buggy", "decoy"):
                namespace: dict[str, object] = {}
                exec(template.source(params, which), namespace)
                function = namespace[template.name]
                outcome = []
                for args, expected in template.cases:
                    try:
                        got = eval(f"f({args})", {"f": function})
                    except Exception as error:
                        outcome.append((False, repr(error)))
                    else:
                        outcome.append((got == eval(expected), repr(got)))
                results[which] = outcome
            assert all(ok for ok, _ in results["correct"]), (template.name, results)
            ok, got = results["buggy"][template.example]
            assert not ok and got == template.buggy_result, (template.name, got)
            assert not all(ok for ok, _ in results["decoy"]), template.name


def test_every_catalogue_entry_within_one_cycle() -> None:
    for seed in (0, 1):
        tasks = generate_tasks(len(CATALOGUE), seed=seed)
        names = {_named(t)[0] for t in tasks}
        assert names == set(BY_NAME)


def test_problem_statement_names_real_file_and_function() -> None:
    for task in generate_tasks(40, seed=5):
        parsed = parse_problem_statement(task.problem_statement)
        assert parsed is not None
        function, path = parsed
        source = task.files[path].decode()
        assert f"def {function}(" in source
        assert re.search(
            rf"`{function}\(.*\)` returns .+ but should return .+", task.problem_statement
        )
        n_functions = sum(
            v.decode().count("\ndef ") for k, v in task.files.items() if not k.startswith("tests/")
        )
        assert 3 <= n_functions <= 6
        modules = [k for k in task.files if k.endswith(".py") and not k.startswith("tests/")]
        assert 2 <= len(modules) <= 3  # __init__.py plus one or two modules
        # The buggy line occurs once, so `edit_file` can replace it.
        path_, old, _ = reference_patch(task)
        assert path_ == path and source.count(old) == 1


def test_patches_reject_foreign_tasks() -> None:
    with pytest.raises(InvalidRequestError):
        reference_patch(common_pb2.TaskSpec(task_id="x", problem_statement="fix it"))
    task = generate_task(0, 0)
    _, old, new = reference_patch(task)
    fixed = common_pb2.TaskSpec()
    fixed.CopyFrom(task)
    fixed.files.update(_patched(task, (reference_patch(task)[0], old, new)))
    with pytest.raises(InvalidRequestError):
        wrong_patch(fixed)  # no buggy line any more


def test_locate_bug_in_cat_output_keeps_indentation() -> None:
    task = generate_task(0, 1)
    function, path = _named(task)
    observation = task.files[path].decode() + "\n[exit code 0]"
    site = locate_bug(observation, function)
    assert site is not None
    assert site.old in task.files[path].decode()
    assert site.old.startswith("    ")
    assert locate_bug(observation, "no_such_function") is None
    assert locate_bug("", function) is None


@pytest.mark.integration
@pytest.mark.parametrize("index", range(N_REAL))
def test_tests_for_real(index: int, tmp_path: Path) -> None:
    task = generate_task(11, index)
    buggy = tmp_path / "buggy"
    _write(buggy, dict(task.files))
    visible = _unittest(buggy, "test*.py")
    assert visible.returncode == 0 and _ran(visible) > 0, visible.stderr

    for name, files, passes in (
        ("buggy", dict(task.files), False),
        ("fixed", _patched(task, reference_patch(task)), True),
        ("wrong", _patched(task, wrong_patch(task)), False),
    ):
        root = tmp_path / name
        _write(root, files)
        _write(root, dict(task.hidden_files))
        hidden = _unittest(root, "test_hidden*.py")
        assert (hidden.returncode == 0) is passes, (name, hidden.stderr)
        assert _ran(hidden) > 0
        if name == "fixed":  # the visible tests still pass with the fix
            assert _unittest(root, "test*.py").returncode == 0


@pytest.mark.integration
def test_eval_command_as_shell(tmp_path: Path) -> None:
    """The literal `eval_command`, through a shell, from the repository root."""
    task = generate_task(2, 4)
    _write(tmp_path, {**dict(task.files), **dict(task.hidden_files)})
    failing = subprocess.run(task.eval_command, shell=True, cwd=tmp_path, capture_output=True)
    assert failing.returncode != 0
    _write(tmp_path, _patched(task, reference_patch(task)))
    passing = subprocess.run(task.eval_command, shell=True, cwd=tmp_path, capture_output=True)
    assert passing.returncode == 0, passing.stderr


def test_real_tasks_cover_the_catalogue() -> None:
    names = {_named(generate_task(11, i))[0] for i in range(N_REAL)}
    assert names == set(BY_NAME)
