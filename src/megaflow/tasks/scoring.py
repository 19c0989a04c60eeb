"""Scoring a `swe-synth` repository without running it, for simulated environments.

The real reward runs the hidden tests inside a sandbox. Benchmarks of the
orchestrator use `SimulatedEnvironmentService`, which runs nothing: it scores the
repository by reading the line the hidden tests target instead — reward 1 when the
buggy function's body holds the catalogue's correct line. For the edits the
simulated policy makes (the true fix, or the catalogue's decoy) this agrees with
the hidden tests; `tests/tasks/test_scoring.py` checks that it does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from megaflow.tasks.catalogue import BY_NAME

_HIDDEN = re.compile(r"^tests/test_hidden_(\w+)\.py$")
_ANY_DEF = re.compile(r"\s*def \w+\(")


def simulated_reward(files: Mapping[str, bytes], hidden_files: Mapping[str, bytes]) -> float:
    """1.0 if the function the hidden tests target carries its correct line, else 0.0."""
    targets = [m.group(1) for p in hidden_files if (m := _HIDDEN.match(p))]
    template = BY_NAME.get(targets[0]) if targets else None
    if template is None:
        return 0.0
    for path, content in files.items():
        if not path.endswith(".py"):
            continue
        if f"def {template.name}(".encode() not in content:
            continue  # cheap test first: most files do not define it
        found = _function_body(content.decode(errors="replace"), template.name)
        if found is None:
            continue
        params, body = found
        if len(params) != len(template.placeholders):
            return 0.0
        return 1.0 if template.line("correct", params) in body else 0.0
    return 0.0


def _function_body(text: str, function: str) -> tuple[tuple[str, ...], set[str]] | None:
    """(parameter names, stripped body lines) of `def function(...)` in `text`."""
    lines = text.splitlines()
    header = re.compile(rf"\s*def {function}\((.*)\)\s*(?:->[^:]*)?:")
    for i, line in enumerate(lines):
        if "def " not in line:
            continue
        match = header.match(line)
        if match is None:
            continue
        params = tuple(
            p.split(":")[0].split("=")[0].strip() for p in match.group(1).split(",") if p.strip()
        )
        body: set[str] = set()
        for follower in lines[i + 1 :]:
            if "def " in follower and _ANY_DEF.match(follower):
                break
            body.add(follower.strip())
        return params, body
    return None
