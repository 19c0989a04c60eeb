"""Test-log parsers: one per test framework, found through a registry (plug-ins).

A parser reads the output of a test run and says what happened to each test the
evaluation asked about::

    def parse(log: str, test_ids: Sequence[str]) -> dict[str, str]

returning a status per test id it found (``"passed" | "failed" | "error" |
"skipped"``); an id it did not find is ``"missing"`` to the caller. The ids are given
because real ids contain spaces, brackets and " - " (pytest's ``FAILED id - message``
lines cannot be split without knowing them).

Built-in: ``pytest`` (the ``-rA`` short summary). Others register under the entry-point
group ``megaflow.log_parsers`` or are named by dotted path (`megaflow.core.registry`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from megaflow.core.registry import Registry

LogParser = Callable[[str, Sequence[str]], dict[str, str]]

PASSED, FAILED, ERROR, SKIPPED, MISSING = "passed", "failed", "error", "skipped", "missing"

LOG_PARSERS: Registry[LogParser] = Registry("megaflow.log_parsers", "log parser", check=callable)

_PYTEST_STATUS = {
    "PASSED": PASSED,
    "XFAIL": PASSED,  # an expected failure happened: the test did what it says
    "FAILED": FAILED,
    "XPASS": FAILED,
    "ERROR": ERROR,
    "SKIPPED": SKIPPED,
}
_PYTEST_LINE = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+)$")


def parse_pytest(log: str, test_ids: Sequence[str]) -> dict[str, str]:
    """Statuses from pytest's ``-rA`` summary (``PASSED id``, ``FAILED id - why``...).

    A line names a test when it is exactly ``STATUS id`` or ``STATUS id - ...``; the
    last line naming a test wins (pytest prints an ERROR at teardown after a PASSED).
    """
    wanted = set(test_ids)
    found: dict[str, str] = {}
    for line in log.splitlines():
        match = _PYTEST_LINE.match(line.rstrip())
        if match is None:
            continue
        status, rest = _PYTEST_STATUS[match.group(1)], match.group(2)
        if rest in wanted:
            found[rest] = _worse(found.get(rest), status)
            continue
        for test_id in _prefixes(rest):
            if test_id in wanted:
                found[test_id] = _worse(found.get(test_id), status)
                break
    return found


def _prefixes(rest: str) -> list[str]:
    """Candidate ids of ``id - message``: everything before each " - ", longest first."""
    cuts = [m.start() for m in re.finditer(" - ", rest)]
    return [rest[:cut] for cut in reversed(cuts)]


_RANK = {PASSED: 0, SKIPPED: 1, FAILED: 2, ERROR: 3}


def _worse(old: str | None, new: str) -> str:
    """A test that passed its call but errored at teardown did not pass."""
    if old is None:
        return new
    return old if _RANK.get(old, 0) >= _RANK.get(new, 0) else new


LOG_PARSERS.add("pytest", lambda: parse_pytest)
