"""psutil is a dev dependency: only tests, benchmarks and megaflow.testing may use it."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "megaflow"


def test_production_code_does_not_import_psutil() -> None:
    importing = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "testing" not in path.relative_to(SRC).parts
        and re.search(r"^\s*(import|from)\s+psutil\b", path.read_text(), re.M)
    ]
    assert importing == []
