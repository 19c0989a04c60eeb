"""Every ```python example of README.md and docs/api.md runs, as written, in its own
process and an empty folder, against real sandboxes and (for the client examples) a
real deployment of four processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.testing.processes import deployment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "api.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for n, match in enumerate(_BLOCK.finditer(doc.read_text()), 1):
            found.append((f"{doc.name}#{n}", match.group(1)))
    return found


EXAMPLES = _examples()


def test_the_docs_have_examples_to_run() -> None:
    names = [name for name, _ in EXAMPLES]
    assert sum(n.startswith("README") for n in names) >= 2
    assert sum(n.startswith("api") for n in names) >= 4
    assert any("megaflow.connect" in code for _, code in EXAMPLES)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("deployment")
    with deployment(
        str(tmp / "ledger.sqlite"),
        model=("--time-scale", "0"),
        env=("--sandbox-dir", str(tmp / "sb")),
        agent=(),
    ) as procs:
        yield procs["scheduler"].address


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(name: str, code: str, served: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "MEGAFLOW_SCHEDULER": served},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, f"{name} failed:\n{code}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{name} printed nothing"
