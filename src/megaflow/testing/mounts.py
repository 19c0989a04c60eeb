"""The host's mounts as tests and fixtures see them (psutil: a dev dependency)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil


def mounts_under(folder: str | Path) -> list[str]:
    """Mount points of this mount namespace at or below ``folder``, deepest first."""
    prefix = str(folder)
    points = [
        p.mountpoint
        for p in psutil.disk_partitions(all=True)
        if p.mountpoint == prefix or p.mountpoint.startswith(prefix + "/")
    ]
    return sorted(points, key=len, reverse=True)


def unmount_all(folder: str | Path, attempts: int = 5) -> None:
    """Lazily unmount (``umount -l``) every mount at or below ``folder``, deepest first,
    until none is left or ``attempts`` rounds have passed."""
    for _ in range(attempts):
        points = mounts_under(folder)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
