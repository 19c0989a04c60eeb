"""Images on demand at the task level: 100 tasks asking at once for one uncached image
cause exactly one pull; an image with zstd layers, pulled by skopeo, runs tasks; a
missing image fails its tasks at once (no retry), naming it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megaflow.agent.session import AgentLimits
from megaflow.cli.main import app
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.images.build import (
    build_busybox_rootfs,
    build_oci_image,
    tar_layer,
    write_oci_layout,
)
from megaflow.env.local.backend import LocalBackend
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.scheduler.state import SchedulerPolicy
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.registry import LocalRegistry, push_rootfs, skopeo_push
from megaflow.testing.scripted import Script, ScriptedBackend, Step, tool_call
from megaflow.v1 import model_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path / "registry")
    await reg.start()
    try:
        rootfs = build_busybox_rootfs(tmp_path / "fs")
        await push_rootfs(reg.address, "megaflow/busybox", "1", rootfs)
        layout = write_oci_layout(tmp_path / "layout", build_oci_image([tar_layer(rootfs)], "oci"))
        skopeo_push(layout, f"{reg.address}/megaflow/busybox:zstd", compress="zstd")
        yield reg
    finally:
        reg.stop()


class Recording(ScriptedBackend):
    """Replays a script and keeps what the tools answered."""

    def __init__(self, script: Script) -> None:
        super().__init__(script)
        self.tool_output: list[str] = []

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        self.tool_output += [m.content for m in request.messages if m.role == "tool"]
        return await super().generate(request)


def _submit(task: str, i: int) -> Step:
    return tool_call("submit")


async def _run(
    tmp_path: Path, image: str, n: int, backend: ScriptedBackend | None = None
) -> tuple[RunSummary, int]:
    """The run's summary and how many image pulls it caused."""
    system = EmbeddedSystem(
        backends=[backend or ScriptedBackend(_submit)],
        ledger_path=tmp_path / "ledger.sqlite",
        env_config=EnvServiceConfig(
            root_dir=tmp_path / "sb",
            image_cache_dir=tmp_path / "images",
            max_environments=n,
            # The test registry speaks plain HTTP: allowed for its host only.
            insecure_registries=(image.split(":", 1)[1].lstrip("/").split("/")[0],),
        ),
        agent_limits=AgentLimits(max_steps=2),
        policy=SchedulerPolicy(default_max_attempts=2, retry_base_s=0.05),
    )
    tasks = generate_tasks(n, seed=1)
    for task in tasks:
        task.image = image
    async with system:
        summary = await run_batch(system.scheduler, tasks, tmp_path / "out", max_concurrency=n)
        assert isinstance(system.env, SandboxEnvironmentService)
        local = system.env.factory.backend("local")
        assert isinstance(local, LocalBackend)
        pulls = local.image_store().pulls
    return summary, pulls


async def test_hundred_tasks_one_pull(registry: LocalRegistry, tmp_path: Path) -> None:
    summary, pulls = await _run(tmp_path, f"registry:{registry.address}/megaflow/busybox:1", 100)
    assert summary.finished == 100
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in summary.records)
    assert pulls == 1


async def test_zstd_image_from_a_registry_runs_tasks(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    image = f"docker://{registry.address}/megaflow/busybox:zstd"
    probe = "busybox | head -1; test -e /usr/bin/python3 || echo no-python"
    backend = Recording(
        lambda task, i: tool_call("bash", command=probe) if i == 0 else tool_call("submit")
    )
    summary, pulls = await _run(tmp_path, image, 4, backend)
    assert [r["status"] for r in summary.records] == ["succeeded"] * 4
    assert pulls == 1
    probes = [out for out in backend.tool_output if "no-python" in out]
    assert len(probes) >= 4 and all("BusyBox v" in out for out in probes)  # the image's tools


async def test_missing_image_fails_tasks_at_once(registry: LocalRegistry, tmp_path: Path) -> None:
    image = f"registry:{registry.address}/megaflow/nothing:9"
    summary, _ = await _run(tmp_path, image, 5)
    for record in summary.records:
        assert (record["status"], record["reward"]) == ("failed", None)
        assert record["error_kind"] != "infra"
        assert record["attempts"] == 1  # a retry would not make it exist
        assert "megaflow/nothing:9" in record["error"]


async def test_megaflow_run_pulls_with_the_insecure_registry_opt_in(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    image = f"docker://{registry.address}/megaflow/busybox:zstd"
    common = ["run", "--tasks", "2", "--image", image, "--sandbox-dir", str(tmp_path / "sb")]
    runner = CliRunner()
    allowed = await asyncio.to_thread(
        runner.invoke,
        app,
        [*common, "--out", str(tmp_path / "ok"), "--insecure-registry", registry.address],
    )
    assert allowed.exit_code == 0, allowed.output
    records = [json.loads(x) for x in (tmp_path / "ok/results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["succeeded"] * 2
    refused = await asyncio.to_thread(runner.invoke, app, [*common, "--out", str(tmp_path / "no")])
    failed = [json.loads(x) for x in (tmp_path / "no/results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in failed] == ["failed"] * 2, refused.output
    assert all("plain HTTP" in r["error"] for r in failed)
