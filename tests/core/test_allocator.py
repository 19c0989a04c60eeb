"""MegaFlow's processes re-execute themselves onto jemalloc (megaflow.core.allocator):
same PID, same arguments, nothing of it left in the environment their children get."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.core.allocator import library
from megaflow.testing.processes import ServiceProcess

# Prints its PID before and after preload(), then what it runs on and what a child sees.
_PROBE = """
import os, subprocess, sys
print("pid", os.getpid(), flush=True)
import megaflow.core.allocator as allocator
{patch}
allocator.preload()
print("pid", os.getpid())
print("allocator", allocator.current())
print("LD_PRELOAD", os.environ.get("LD_PRELOAD"))
child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
print("child", sorted(k for k in child.split() if "PRELOAD" in k))
print("argv", sys.argv[1:])
"""


def _probe(env: dict[str, str] | None = None, patch: str = "") -> tuple[dict[str, list[str]], str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(patch=patch), "an-argument"],
        env={**_clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        lines.setdefault(key, []).append(value)
    return lines, proc.stderr


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MEGAFLOW_MALLOC")}


def test_the_machine_has_jemalloc() -> None:
    # ./dev installs libjemalloc2; without it every test below would pass vacuously
    assert library() is not None


def test_preload_reexecutes_the_same_process_on_jemalloc() -> None:
    lines, _ = _probe()
    assert len(lines["pid"]) == 3  # before the exec, again after it (same PID), then once
    assert len(set(lines["pid"])) == 1
    assert lines["allocator"] == ["jemalloc"]
    assert lines["argv"] == [str(["an-argument"])]  # the same arguments


def test_children_inherit_nothing_of_the_preload() -> None:
    lines, _ = _probe()
    assert lines["LD_PRELOAD"] == ["None"]
    assert lines["child"] == ["[]"]  # no LD_PRELOAD, no marker for a sandbox or dockerd


def test_a_preload_the_user_set_is_kept() -> None:
    mine = "libm.so.6"
    lines, _ = _probe({"LD_PRELOAD": mine})
    assert lines["allocator"] == ["jemalloc"]
    assert lines["LD_PRELOAD"] == [mine]
    assert lines["child"] == [str([f"LD_PRELOAD={mine}"])]


def test_system_keeps_glibc_and_does_not_reexecute() -> None:
    lines, _ = _probe({"MEGAFLOW_MALLOC": "system"})
    assert len(lines["pid"]) == 2  # no exec
    assert lines["allocator"] == ["glibc malloc"]


def test_a_library_that_does_not_load_is_tried_once() -> None:
    lines, stderr = _probe(patch="allocator.library = lambda: 'libmegaflow-no-such-allocator.so.9'")
    assert len(lines["pid"]) == 3  # one exec, no loop
    assert lines["allocator"] == ["glibc malloc"]
    assert "could not be preloaded" in stderr
    assert lines["child"] == ["[]"]


def test_a_bad_choice_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megaflow.cli", "--help"],
        env={**_clean_env(), "MEGAFLOW_MALLOC": "tcmalloc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "MEGAFLOW_MALLOC='tcmalloc' is not one of jemalloc, system" in proc.stderr


def test_a_service_process_runs_on_jemalloc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEGAFLOW_MALLOC", raising=False)
    proc = ServiceProcess(
        "scheduler", "--listen", "127.0.0.1:0", "--store", str(tmp_path / "s.sqlite")
    ).start()
    try:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libjemalloc" in maps
    finally:
        proc.stop()


def test_a_program_on_stdin_is_not_reexecuted() -> None:
    # re-executing would read stdin again, at its end: the program would silently not run
    proc = subprocess.run(
        [sys.executable, "-"],
        input="from megaflow.core.allocator import preload, current\npreload()\nprint(current())\n",
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "glibc malloc"


def test_a_closed_stdout_does_not_stop_the_reexecution(tmp_path: Path) -> None:
    # `megaflow serve ... >&-`: sys.stdout is None, there is nothing to flush
    marker = tmp_path / "ran"
    script = (
        "from megaflow.core.allocator import preload, current\n"
        "preload()\n"
        f"open({str(marker)!r}, 'w').write(current())\n"
    )
    proc = subprocess.run(
        ["bash", "-c", 'exec "$0" -c "$1" >&-', sys.executable, script],
        env=_clean_env(),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "jemalloc"
