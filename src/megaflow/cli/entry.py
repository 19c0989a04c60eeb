"""The `megaflow` command's entry point: jemalloc first, then the command line.

It imports nothing heavy before `preload()`, which may re-execute the process
(`megaflow.core.allocator`); `python -m megaflow.cli` comes here too.
"""

from __future__ import annotations

from megaflow.core.allocator import preload


def main() -> None:
    preload()
    from megaflow.cli.main import app

    app()
