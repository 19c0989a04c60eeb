"""A SWE-bench-format task set built offline from real code: mpmath's own source and tests.

    rows, url_template = build_swebench_set(tmp / "set")
    rootfs = build_swebench_rootfs(tmp / "rootfs")   # image "dir:<rootfs>"

mpmath (pure Python, shipping its own test suite) is copied from the installed
package into a real git repository (``<dest>/repos/mpmath/mpmath.git``, a bare
repository the tasks clone by ``workspace.git``). Each instance puts one bug back into
real mpmath code and has, as SWE-bench instances have:

- ``base_commit``: mpmath with the bug, and without the tests that catch it;
- ``patch`` (gold): the fix, a ``git diff``;
- ``test_patch``: mpmath's own tests that catch it, put back (``FAIL_TO_PASS``); other
  tests of the same file that pass either way are ``PASS_TO_PASS``.

The first instance's test patch also adds a parametrised test whose ids hold spaces,
brackets, quotes and " - " (as real ids do), to prove the ids reach pytest exactly.
The rootfs is `megaflow.testing.images.python_rootfs` with git and the installed
pytest (and its pure-Python dependencies). Blocking functions; need git and Debian's
python3.11.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = "mpmath/mpmath"
VERSION = "1.3"
PYTEST_DISTRIBUTIONS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
PYTEST_PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py.py")


@dataclass(frozen=True)
class PutBackBug:
    number: int
    source: str  # file in the repository
    correct: str  # the real line (unique in the file)
    buggy: str
    test_file: str
    fail_to_pass: tuple[str, ...]  # test functions removed at the base, restored by test_patch
    pass_to_pass: tuple[str, ...]
    statement: str
    extra_tests: str = ""  # appended by the test patch (with ``fail_to_pass_extra`` ids)
    fail_to_pass_extra: tuple[str, ...] = ()
    pass_to_pass_extra: tuple[str, ...] = ()


EXTRA_TRAILING_TESTS = """

import pytest as _pytest


@_pytest.mark.parametrize(
    "n, zeros",
    [(2**100 - 1, 0), (2**100, 100), (3 << 40, 40)],
    ids=["2**100 - 1", "it's [2**100]", 'x = "3 << 40"'],
)
def test_trailing_cases(n, zeros):
    assert trailing(n) == zeros
"""

BUGS = (
    PutBackBug(
        number=1001,
        source="mpmath/libmp/libintmath.py",
        correct="    return t + small_trailing[n & 0xff]",
        buggy="    return t",
        test_file="mpmath/tests/test_bitwise.py",
        fail_to_pass=("test_trailing",),
        pass_to_pass=("test_bitcount", "test_round_down", "test_add_exact"),
        statement="`mpmath.libmp.trailing(n)` is wrong for multiples of 256: "
        "`trailing(2**100)` returns 96, not 100 (it should count every trailing zero bit).",
        extra_tests=EXTRA_TRAILING_TESTS,
        fail_to_pass_extra=("test_trailing_cases[it's [2**100]]",),
        pass_to_pass_extra=(
            "test_trailing_cases[2**100 - 1]",
            'test_trailing_cases[x = "3 << 40"]',
        ),
    ),
    PutBackBug(
        number=1002,
        source="mpmath/libmp/libmpf.py",
        correct="    if ssign == tsign and texp > sexp+sbc:",
        buggy="    if texp > sexp+sbc:",
        test_file="mpmath/tests/test_division.py",
        fail_to_pass=("test_mod",),
        pass_to_pass=("test_div_1_3", "test_tight_integer_division"),
        statement="`mpf(-0.25) % 23490.5` returns -0.25; Python's rule (the result has the "
        "sign of the divisor) gives 23490.25.",
    ),
    PutBackBug(
        number=1003,
        source="mpmath/ctx_mp.py",
        correct="                im_dist = iexp + ibc",
        buggy="                im_dist = iexp",
        test_file="mpmath/tests/test_basic_ops.py",
        fail_to_pass=("test_nint_distance",),
        pass_to_pass=("test_add", "test_floor_ceil_nint_frac"),
        statement="`nint_distance(mpc(-3+0.1j))` returns (-3, -55) but the distance of "
        "-3+0.1j to -3 is about 2**-3: it should return (-3, -3).",
    ),
)


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=megaflow", "-c", "user.email=megaflow@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def _installed_package(name: str) -> Path:
    module = __import__(name)
    return Path(module.__file__).parent  # type: ignore[arg-type]


def _remove_function(text: str, name: str) -> tuple[str, str]:
    """``text`` without the top-level ``def name(...)`` (up to the next top-level line),
    and the removed source."""
    match = re.search(rf"^def {name}\(.*?(?=^\S|\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"no top-level function {name}")
    return text[: match.start()] + text[match.end() :], match.group(0)


def build_swebench_set(dest: Path) -> tuple[list[dict[str, Any]], str]:
    """Build the repository and the rows; returns (rows, git URL template)."""
    dest = dest.resolve()
    work = dest / "work"
    work.mkdir(parents=True)
    shutil.copytree(
        _installed_package("mpmath"),
        work / "mpmath",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    (work / "README.md").write_text("mpmath: arbitrary-precision arithmetic (a test copy).\n")
    _git(work, "init", "-q", "-b", "main")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "mpmath 1.3.0, as installed")
    upstream = _git(work, "rev-parse", "HEAD").strip()
    rows = []
    for bug in BUGS:
        _git(work, "checkout", "-q", "-B", f"instance-{bug.number}", upstream)
        source, tests = work / bug.source, work / bug.test_file
        original_tests = tests.read_text()
        text = source.read_text()
        if text.count(bug.correct) != 1:
            raise ValueError(f"{bug.source}: the line {bug.correct!r} is not unique")
        source.write_text(text.replace(bug.correct, bug.buggy))
        base_tests = original_tests
        for name in bug.fail_to_pass:
            base_tests, _ = _remove_function(base_tests, name)
        tests.write_text(base_tests)
        _git(work, "commit", "-q", "-am", f"instance {bug.number}: the bug, without its tests")
        base = _git(work, "rev-parse", "HEAD").strip()
        source.write_text(text)
        gold = _git(work, "diff")
        _git(work, "checkout", "-q", "--", ".")
        tests.write_text(original_tests + bug.extra_tests)
        test_patch = _git(work, "diff")
        _git(work, "checkout", "-q", "--", ".")
        ids = [f"{bug.test_file}::{n}" for n in (*bug.fail_to_pass, *bug.fail_to_pass_extra)]
        rows.append(
            {
                "instance_id": f"mpmath__mpmath-{bug.number}",
                "repo": REPO,
                "base_commit": base,
                "problem_statement": bug.statement,
                "patch": gold,
                "test_patch": test_patch,
                "FAIL_TO_PASS": json.dumps(ids),
                "PASS_TO_PASS": json.dumps(
                    [f"{bug.test_file}::{n}" for n in (*bug.pass_to_pass, *bug.pass_to_pass_extra)]
                ),
                "version": VERSION,
                "environment_setup_commit": upstream,
                "hints_text": "",
                "created_at": "2026-12-07T00:00:00Z",
            }
        )
    bare = dest / "repos" / REPO
    bare.parent.mkdir(parents=True)
    _git(dest, "clone", "-q", "--bare", str(work), str(bare) + ".git")
    for bug in BUGS:  # clones of the bare repository fetch every instance's branch
        _git(work, "push", "-q", str(bare) + ".git", f"instance-{bug.number}")
    return rows, f"file://{dest}/repos/{{repo}}.git"


def build_swebench_rootfs(dest: Path) -> Path:
    """A root filesystem with python3, git and pytest (image ``dir:<dest>``)."""
    from megaflow.testing.images import python_rootfs

    root = python_rootfs(dest, tools=(Path("/usr/bin/git"),))
    site = root / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    installed = _installed_package("pytest").parent
    metadata = [p.name for d in PYTEST_DISTRIBUTIONS for p in installed.glob(f"{d}-*.dist-info")]
    for name in (*PYTEST_PACKAGES, *metadata):
        found = installed / name
        if found.is_dir():
            shutil.copytree(found, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif found.is_file():
            shutil.copy2(found, site / name)
    return root
