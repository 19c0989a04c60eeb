"""Large repositories for tests and benchmarks of workspaces by reference."""

from __future__ import annotations

import random
from pathlib import Path


def make_repository(root: Path, files: int, file_bytes: int, seed: int = 0) -> list[str]:
    """Write ``files`` files of ``file_bytes`` random (incompressible) bytes under
    ``root/data``, 100 to a folder; their paths relative to ``root``."""
    rng = random.Random(seed)
    paths = []
    for i in range(files):
        rel = f"data/d{i // 100:03d}/f{i:05d}.bin"
        if i % 100 == 0:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rng.randbytes(file_bytes))
        paths.append(rel)
    return paths
