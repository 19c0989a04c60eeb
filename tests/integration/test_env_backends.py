"""One synthetic task suite, three sandbox backends: `megaflow run` with ``--env local``,
``--env docker`` and ``--env docker --runtime runsc`` (gVisor) gives the same results.

The Docker runs use a private dockerd (`megaflow.testing.dockerd.Dockerd`) and an image
built offline with the host's python3 (`megaflow.testing.images.build_python_image`)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import docker.errors  # type: ignore[import-untyped]
import pytest

from megaflow.env.docker.orphans import LABEL_SANDBOX_ID
from megaflow.testing.dockerd import RUNSC, Dockerd, dockerd_available, prepared_dockerd
from megaflow.testing.images import build_python_image
from megaflow.testing.simulated_model import SimulatedPolicy

pytestmark = pytest.mark.integration

IMAGE = "megaflow-python:test"
TASKS = 4
SUCCESS_RATE = 0.5


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    reason = dockerd_available()
    if reason is not None:
        pytest.skip(f"dockerd cannot run here: {reason}")
    with prepared_dockerd(lambda client: build_python_image(client, IMAGE)) as daemon:
        yield daemon


def megaflow_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "megaflow.cli", "run",
        "--tasks", str(TASKS),
        "--success-rate", str(SUCCESS_RATE),
        "--time-scale", "0",
        "--out", str(tmp_path / "out"),
        "--sandbox-dir", str(tmp_path / "sandboxes"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def assert_suite_passed(tmp_path: Path, proc: subprocess.CompletedProcess[str]) -> None:
    """Every task scored by its hidden tests, with the reward the policy's choice earns."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    results = {r["task_id"]: r for r in map(json.loads, lines)}
    assert len(lines) == TASKS
    assert set(results) == {f"swe-synth-0-{i:05d}" for i in range(TASKS)}
    policy = SimulatedPolicy(success_rate=SUCCESS_RATE, seed=0)
    expected = {task: 1.0 if policy.solves(task) else 0.0 for task in results}
    assert set(expected.values()) == {0.0, 1.0}, "the suite should hold both outcomes"
    for task, r in results.items():
        assert r["status"] == "succeeded" and r["error_kind"] == "none", r
        assert r["reward"] == expected[task], r
    sandboxes = tmp_path / "sandboxes"
    assert not sandboxes.exists() or not any(sandboxes.iterdir())


def assert_no_containers(daemon: Dockerd) -> None:
    client = daemon.client()
    try:
        assert client.containers.list(all=True, filters={"label": LABEL_SANDBOX_ID}) == []
        assert client.containers.list(all=True) == []
    finally:
        client.close()


class RuntimeWatcher:
    """Records the image and runtime of each sandbox container while a run goes on."""

    def __init__(self, daemon: Dockerd) -> None:
        self.daemon = daemon
        self.seen: dict[str, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        api = self.daemon.api(timeout_s=10)
        try:
            while not self._stop.wait(0.05):
                for summary in api.containers(all=True, filters={"label": LABEL_SANDBOX_ID}):
                    if summary["Id"] in self.seen:
                        continue
                    try:
                        info = api.inspect_container(summary["Id"])
                    except docker.errors.NotFound:
                        continue
                    self.seen[summary["Id"]] = (
                        info["Config"]["Image"],
                        info["HostConfig"]["Runtime"],
                    )
        finally:
            api.close()

    def __enter__(self) -> RuntimeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_local_backend_runs_the_suite(tmp_path: Path) -> None:
    assert_suite_passed(tmp_path, megaflow_run(tmp_path))


@pytest.mark.parametrize(
    "runtime",
    [
        "runc",
        pytest.param(
            "runsc",
            marks=pytest.mark.skipif(not RUNSC.exists(), reason="runsc is not installed"),
        ),
    ],
)
def test_docker_backend_runs_the_same_suite(tmp_path: Path, dockerd: Dockerd, runtime: str) -> None:
    with RuntimeWatcher(dockerd) as watcher:
        proc = megaflow_run(
            tmp_path,
            "--env", "docker",
            "--image", IMAGE,
            "--docker-host", dockerd.base_url,
            "--runtime", runtime,
        )  # fmt: skip
    assert_suite_passed(tmp_path, proc)
    # The tasks ran in containers of the image and runtime asked for (seen while running).
    assert watcher.seen, "no sandbox container was seen during the run"
    assert set(watcher.seen.values()) == {(IMAGE, runtime)}, watcher.seen
    assert_no_containers(dockerd)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["--env", "docker"], "the docker backend needs an image name"),
        (["--runtime", "runsc"], "the local backend takes no runtime"),
        (["--env", "docker", "--image", IMAGE, "--runtime", "kata"], "'runc' or 'runsc'"),
        (["--env", "vm"], "unknown sandbox backend 'vm'; known: docker, local"),
        (["--image", IMAGE], "is not available to the local backend"),
        (["--docker-host", "unix:///x.sock"], "--docker-host applies to --env docker only"),
    ],
)
def test_bad_backend_options_are_refused(
    tmp_path: Path, options: list[str], complaint: str
) -> None:
    proc = megaflow_run(tmp_path, *options)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert complaint in " ".join(proc.stderr.replace("│", " ").split())
    assert not (tmp_path / "out" / "results.jsonl").exists()
