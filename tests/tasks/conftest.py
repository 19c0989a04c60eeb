"""A SWE-bench-format set built from mpmath (shared: building it takes a second)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from megaflow.testing.swebench_set import build_swebench_set


@pytest.fixture(scope="session")
def mpmath_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str]:
    """(rows, git URL template) of the mpmath set."""
    return build_swebench_set(tmp_path_factory.mktemp("mpmath-set"))


@pytest.fixture(scope="session")
def swebench_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megaflow.testing.swebench_set import build_swebench_rootfs

    return build_swebench_rootfs(tmp_path_factory.mktemp("swebench-image") / "rootfs")
