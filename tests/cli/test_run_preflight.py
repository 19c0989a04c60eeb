"""`megaflow run` fails fast and clearly when the model server is wrong, and its exit
status and summary tell a run that lost tasks from one that did not.

Each case runs the real CLI in a subprocess against a real llm-katan (which checks keys
with `--validate-keys`) or against nothing at all (a free port)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.testing.llm_katan import DEFAULT_API_KEY, LlmKatanServer, free_port
from megaflow.testing.processes import spawn_logged, stop_group
from megaflow.testing.server import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def katan() -> Iterator[LlmKatanServer]:
    with LlmKatanServer(model="katan-preflight", extra_args=["--validate-keys"]) as server:
        yield server


def _run(
    tmp_path: Path, *args: str, key: str | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    if key is not None:
        env["OPENAI_API_KEY"] = key
    command = [sys.executable, "-m", "megaflow.cli", "run", "--out", str(tmp_path / "out")]
    command += ["--sandbox-dir", str(tmp_path / "sb"), "--time-scale", "0", *args]
    t0 = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    return proc, time.monotonic() - t0


def _no_task_started(tmp_path: Path, proc: subprocess.CompletedProcess[str]) -> None:
    assert "run id:" not in proc.stderr, proc.stderr  # nothing was submitted
    results = tmp_path / "out" / "results.jsonl"
    assert not results.exists() or results.read_text() == ""


def _one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def test_a_wrong_port_is_one_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc, took = _run(tmp_path, "--model", f"openai:http://127.0.0.1:{port}", key="k")
    assert proc.returncode == 2, proc.stderr
    err = _one_line(proc.stderr)
    assert f"model server http://127.0.0.1:{port}/v1 is unreachable" in err, err
    assert "is the URL or port wrong?" in err
    assert "Traceback" not in proc.stderr
    _no_task_started(tmp_path, proc)
    assert took < 30  # ~1-2 s: the process start, then a refused connection


def test_an_unknown_host_is_one_clear_error(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, "--model", "openai:http://no-such-host.invalid:8000", key="k")
    assert proc.returncode == 2, proc.stderr
    assert "no-such-host.invalid:8000/v1 is unreachable" in _one_line(proc.stderr)
    _no_task_started(tmp_path, proc)


def test_a_wrong_model_name_is_one_clear_error(katan: LlmKatanServer, tmp_path: Path) -> None:
    spec = f"openai:{katan.base_url}#gpt-nope"
    proc, took = _run(tmp_path, "--model", spec, key=DEFAULT_API_KEY)
    assert proc.returncode == 2, proc.stderr
    err = _one_line(proc.stderr)
    assert "does not serve model 'gpt-nope'; it serves: 'katan-preflight'" in err, err
    _no_task_started(tmp_path, proc)
    assert took < 30


def test_a_missing_key_is_one_clear_error(katan: LlmKatanServer, tmp_path: Path) -> None:
    proc, took = _run(tmp_path, "--model", f"openai:{katan.base_url}#{katan.model}")
    assert proc.returncode == 2, proc.stderr
    err = _one_line(proc.stderr)
    assert "requires an API key (HTTP 401" in err and "export OPENAI_API_KEY" in err, err
    _no_task_started(tmp_path, proc)
    assert took < 30


def test_a_wrong_key_is_one_clear_error(katan: LlmKatanServer, tmp_path: Path) -> None:
    spec = f"openai:{katan.base_url}#{katan.model}"
    proc, _ = _run(tmp_path, "--model", spec, key="not-the-key")
    assert proc.returncode == 2, proc.stderr
    err = _one_line(proc.stderr)
    assert "rejected the API key (HTTP 401" in err and "check OPENAI_API_KEY" in err, err
    _no_task_started(tmp_path, proc)


def test_serve_model_refuses_a_wrong_model_but_waits_for_a_server_still_starting(
    katan: LlmKatanServer, tmp_path: Path
) -> None:
    """`megaflow serve model` fronting an OpenAI server: a model it does not serve is one
    clear error at start (exit 2); a server not answering yet is not (it may be loading):
    the service starts, and is stopped here by its PID."""
    env = {**os.environ, "OPENAI_API_KEY": DEFAULT_API_KEY}
    serve = [sys.executable, "-m", "megaflow.cli", "serve", "model", "--listen", "127.0.0.1:0"]
    wrong = subprocess.run(
        [*serve, "--model", f"openai:{katan.base_url}#gpt-nope"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert wrong.returncode == 2, wrong.stderr
    assert "does not serve model 'gpt-nope'" in _one_line(wrong.stderr), wrong.stderr
    absent = f"openai:http://127.0.0.1:{free_port()}#m"
    proc = spawn_logged([*serve, "--model", absent], tmp_path / "serve.log", env=env)
    try:
        wait_for("the model service to start",
                 lambda: "ready on" in (tmp_path / "serve.log").read_text(), 60,
                 lambda: (tmp_path / "serve.log").read_text())  # fmt: skip
    finally:
        stop_group(proc)


def test_a_run_whose_tasks_all_end_without_a_result_exits_1(tmp_path: Path) -> None:
    """Every task is invalid (its image does not exist): the run must not exit 0, and
    its summary names the class and the error."""
    proc, _ = _run(tmp_path, "--tasks", "3", "--image", "dir:/nonexistent")
    assert proc.returncode == 1, proc.stderr
    err = _one_line(proc.stderr)
    for label in (
        "succeeded (scored) │ 0",
        "failed: task (scored) │ 0",
        "failed: infrastructure (no result) │ 0",
        "failed: invalid (no result) │ 3",
        "cancelled (no result) │ 0",
    ):
        assert label in err, err
    assert "commonest errors" in err
    assert "│ 3 │ ImageNotFoundError: image dir:/nonexistent" in err, err
    assert "3 of 3 tasks ended without a result" in err


def test_a_run_with_only_scored_tasks_exits_0(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, "--tasks", "3", "--success-rate", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "without a result" not in proc.stderr
