"""`swe-synth`: synthetic software-engineering tasks with one injected bug each.

Each task is a small Python repository: a package with one or two modules of
3-6 small functions drawn from `megaflow.tasks.catalogue`, a README, and
visible tests (under `tests/`) for every function but one. That one function
carries the catalogue's buggy line; the hidden tests (`tests/test_hidden_*.py`,
copied in after the agent submits) test it thoroughly, together with the other
functions. Evaluation needs only the standard library: `hidden_runner.py` (copied in
with them) runs exactly those tests in an isolated interpreter and exits with a
per-task success code (see its docstring for what that defends against).

Everything is a pure function of `(seed, index)`: task `i` is the same whatever
the number of tasks generated, and the buggy functions cycle through the whole
catalogue (in a seed-dependent order) every `len(CATALOGUE)` tasks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from megaflow.core.errors import InvalidRequestError
from megaflow.tasks.catalogue import CATALOGUE, BugSite, FunctionTemplate, locate_bug
from megaflow.v1 import common_pb2

FAMILY = "swe-synth"
RUNNER_PATH = ".megaflow/hidden_tests.py"
EVAL_TEMPLATE = (
    # -B and a pycache prefix that cannot exist: compile from source, never trust a
    # __pycache__ entry (an edit of the same size within a second looks unchanged).
    "printf '%s\\n' {code} | python3 -I -B -X pycache_prefix=/nonexistent/megaflow "
    + RUNNER_PATH
    + " {test_file} {count}; test $? -eq {code}"
)
VISIBLE_TEST_COMMAND = "python3 -m unittest discover -s tests -q"
MAX_STEPS = 20

_PREFIXES = (
    "tiny",
    "handy",
    "quick",
    "plain",
    "micro",
    "mini",
    "simple",
    "little",
    "neat",
    "basic",
)
_SUFFIXES = ("utils", "tools", "kit", "lib", "ops", "funcs", "helpers", "box", "bits", "aid")
_MODULES = ("core", "basics", "arith", "text", "helpers", "misc", "ops", "funcs", "common", "util")
_STATEMENT = re.compile(r"function `(\w+)` in `([^`\s]+\.py)`")


@dataclass(frozen=True)
class _Function:
    template: FunctionTemplate
    params: tuple[str, ...]
    module: str


def task_id(seed: int, index: int) -> str:
    """The id of task `index` of `seed`."""
    return f"{FAMILY}-{seed}-{index:05d}"


def generate_tasks(n: int, seed: int = 0) -> list[common_pb2.TaskSpec]:
    """Tasks `0 .. n-1` of `seed`; deterministic, task `i` independent of `n`."""
    if n < 0:
        raise InvalidRequestError(f"n must be >= 0, got {n}")
    return [generate_task(seed, i) for i in range(n)]


def generate_task(seed: int, index: int) -> common_pb2.TaskSpec:
    """Task `index` of `seed`, a pure function of both."""
    order = list(range(len(CATALOGUE)))
    random.Random(f"{FAMILY}/{seed}").shuffle(order)
    buggy = CATALOGUE[order[index % len(order)]]
    rng = random.Random(f"{FAMILY}/{seed}/{index}")

    count = rng.randint(3, 6)
    others = rng.sample([t for t in CATALOGUE if t is not buggy], count - 1)
    chosen = [buggy, *others]
    rng.shuffle(chosen)
    package = rng.choice(_PREFIXES) + rng.choice(_SUFFIXES)
    n_modules = 2 if count >= 4 and rng.random() < 0.5 else 1
    modules = rng.sample(_MODULES, n_modules)
    cut = rng.randint(2, count - 2) if n_modules == 2 else count
    functions = [
        _Function(t, rng.choice(t.variants), modules[0] if k < cut else modules[-1])
        for k, t in enumerate(chosen)
    ]
    bug = next(f for f in functions if f.template is buggy)

    files: dict[str, bytes] = {
        "README.md": _readme(package, functions).encode(),
        f"{package}/__init__.py": f'"""{package}: small utility functions."""\n'.encode(),
    }
    for module in modules:
        in_module = [f for f in functions if f.module == module]
        files[f"{package}/{module}.py"] = _module_source(in_module, bug).encode()
        visible = [f for f in in_module if f is not bug]
        files[f"tests/test_{module}.py"] = _test_source(
            f"Tests of {package}.{module}.", package, visible
        ).encode()
    hidden_path = f"tests/test_hidden_{bug.template.name}.py"
    hidden = _test_source(
        f"Hidden tests of {package}: {bug.template.name} thoroughly, and the rest.",
        package,
        [bug, *(f for f in functions if f is not bug)],
    )
    path = f"{package}/{bug.module}.py"
    # A success code only the evaluation knows: agent code cannot exit with it by accident.
    code = rng.randint(3, 125)
    eval_command = EVAL_TEMPLATE.format(
        code=code, test_file=hidden_path, count=len(re.findall(r"^\s+def test_", hidden, re.M))
    )
    return common_pb2.TaskSpec(
        task_id=task_id(seed, index),
        family=FAMILY,
        problem_statement=_statement(bug.template, path),
        image="host",
        files=files,
        hidden_files={hidden_path: hidden.encode(), RUNNER_PATH: _runner_source()},
        eval_command=eval_command,
        budgets=common_pb2.TaskBudgets(max_steps=MAX_STEPS),
        max_attempts=0,
    )


@cache
def _runner_source() -> bytes:
    return (Path(__file__).parent / "hidden_runner.py").read_bytes()


def parse_problem_statement(statement: str) -> tuple[str, str] | None:
    """(function, path) named by a `swe-synth` problem statement, or None."""
    match = _STATEMENT.search(statement)
    return (match.group(1), match.group(2)) if match else None


def reference_patch(task: common_pb2.TaskSpec) -> tuple[str, str, str]:
    """(path, buggy_line, fixed_line): the edit that solves `task`."""
    path, site = _bug_site(task)
    return path, site.old, site.fixed


def wrong_patch(task: common_pb2.TaskSpec) -> tuple[str, str, str]:
    """(path, buggy_line, decoy_line): a plausible edit that still fails the hidden tests."""
    path, site = _bug_site(task)
    return path, site.old, site.decoy


def _bug_site(task: common_pb2.TaskSpec) -> tuple[str, BugSite]:
    parsed = parse_problem_statement(task.problem_statement)
    if parsed is None or parsed[1] not in task.files:
        raise InvalidRequestError(f"task {task.task_id!r} is not a swe-synth task")
    function, path = parsed
    site = locate_bug(task.files[path].decode(), function)
    if site is None:
        raise InvalidRequestError(f"task {task.task_id!r}: no buggy line in {function}")
    return path, site


def _statement(template: FunctionTemplate, path: str) -> str:
    args, expected = template.cases[template.example]
    call = f"{template.name}({args})"
    return (
        f"The function `{template.name}` in `{path}` has a bug: `{call}` returns "
        f"{template.buggy_result} but should return {expected}.\n\n"
        f"Fix `{template.name}` so that it does what its docstring says, without changing its "
        "signature or the tests. The visible tests run from the repository root with "
        f"`{VISIBLE_TEST_COMMAND}`."
    )


def _readme(package: str, functions: list[_Function]) -> str:
    lines = [f"# {package}", "", "Small utility functions.", ""]
    for f in functions:
        lines.append(f"- `{package}.{f.module}.{f.template.name}`: {f.template.doc}")
    lines += ["", "Run the tests from the repository root:", "", f"    {VISIBLE_TEST_COMMAND}", ""]
    return "\n".join(lines)


def _module_source(functions: list[_Function], bug: _Function) -> str:
    names = ", ".join(f.template.name for f in functions)
    parts = [f'"""Small helpers: {names}."""\n']
    for f in functions:
        parts.append(f.template.source(f.params, "buggy" if f is bug else "correct"))
    return "\n\n".join(parts)


def _test_source(doc: str, package: str, functions: list[_Function]) -> str:
    lines = [f'"""{doc}"""', "", "import unittest", ""]
    for module in sorted({f.module for f in functions}):
        names = sorted(f.template.name for f in functions if f.module == module)
        lines.append(f"from {package}.{module} import {', '.join(names)}")
    for f in functions:
        t = f.template
        cls = "".join(part.capitalize() for part in t.name.split("_"))
        lines += ["", "", f"class Test{cls}(unittest.TestCase):"]
        for k, (args, expected) in enumerate(t.cases):
            lines += [
                f"    def test_{t.name}_{k}(self):",
                f"        self.assertEqual({t.name}({args}), {expected})",
                "",
            ]
        lines.pop()
    lines += ["", "", 'if __name__ == "__main__":', "    unittest.main()", ""]
    return "\n".join(lines)
