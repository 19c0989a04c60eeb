"""A sandbox backend from outside MegaFlow: the ``tinybox`` package (tests/plugins/tinybox)
registers itself by entry point, as a pip-installed distribution would, and runs real
tasks; the backends' declared capabilities, settings and names are checked."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import run_batch
from megaflow.env.registry import BACKENDS, backend_class
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.factory import backend_from_spec
from megaflow.model.latency import LatencyConfig
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.v1 import common_pb2, env_pb2

PLUGIN = Path(__file__).parents[1] / "plugins" / "tinybox"


def install_entry_points(project: Path, site: Path) -> None:
    """What ``pip install`` leaves for importlib.metadata: a dist-info with the project's
    entry points (read from its pyproject.toml), and the code on sys.path."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    dist_info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    lines = []
    for group, points in meta["entry-points"].items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {value}" for name, value in points.items())
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def tinybox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The tinybox distribution, importable and registered for this test only."""
    install_entry_points(PLUGIN, tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PLUGIN))
    import megaflow_tinybox

    megaflow_tinybox.BUILT.clear()
    yield megaflow_tinybox
    BACKENDS._loaded.pop("tinybox", None)  # the next test may run without the plug-in


def _config(tmp_path: Path, **overrides: object) -> EnvServiceConfig:
    return EnvServiceConfig(root_dir=tmp_path / "sb", reap_interval_s=0.2, **overrides)  # type: ignore[arg-type]


def test_an_entry_point_registers_a_backend(tinybox: ModuleType) -> None:
    assert "tinybox" in BACKENDS.names()
    assert backend_class("tinybox") is tinybox.TinyboxBackend
    with pytest.raises(
        InvalidRequestError, match="unknown sandbox backend 'vm'; known: docker, local, tinybox"
    ):
        backend_class("vm")


def test_without_the_package_the_name_is_unknown() -> None:
    with pytest.raises(
        InvalidRequestError, match="unknown sandbox backend 'tinybox'; known: docker, local"
    ):
        backend_class("tinybox")


async def test_a_plugin_backend_runs_tasks_end_to_end(tinybox: ModuleType, tmp_path: Path) -> None:
    model = backend_from_spec(
        "simulated",
        success_rate=1.0,
        latency=LatencyConfig(prefill_s_per_token=0, decode_s_per_token=0),
    )
    system = EmbeddedSystem(
        backends=[model], ledger_path=tmp_path / "ledger.sqlite", env_config=_config(tmp_path)
    )
    tasks = generate_tasks(6, seed=3)
    for task in tasks:
        task.placement.backend = "tinybox"
        task.limits.memory_mib = 4096  # tinybox caps it
    async with system:
        summary = await run_batch(system.scheduler, tasks, tmp_path / "out", max_concurrency=3)
    assert len(summary.records) == 6
    for record in summary.records:
        assert (record["status"], record["error_kind"], record["attempts"]) == (
            "succeeded",
            "none",
            1,
        ), record
        assert record["reward"] == 1.0  # the hidden tests passed inside a tinybox sandbox
    assert len(tinybox.BUILT) >= 6  # every task's sandbox came from the plug-in
    assert {(memory, pids) for _, memory, pids in tinybox.BUILT} == {(256, 64)}
    assert not any((tmp_path / "sb-tinybox").iterdir())  # every sandbox removed
    assert not any((tmp_path / "sb").iterdir())  # and none made by the local backend


async def _create(svc: SandboxEnvironmentService, backend: str) -> str:
    placement = common_pb2.EnvPlacement(backend=backend)
    request = env_pb2.CreateEnvironmentRequest(placement=placement, files={"a.txt": b"hi"})
    return (await svc.create_environment(request)).env_id


async def test_undeclared_capabilities_are_refused_not_probed(
    tinybox: ModuleType, tmp_path: Path
) -> None:
    async with SandboxEnvironmentService(_config(tmp_path)) as svc:
        env_id = await _create(svc, "tinybox")
        # TinySandbox inherits LocalSandbox.suspend, but does not declare it: refused.
        with pytest.raises(InvalidRequestError, match="suspend is not supported"):
            await svc.suspend_environment(env_pb2.SuspendEnvironmentRequest(env_id=env_id))
        step = await svc.execute_step(
            env_pb2.ExecuteStepRequest(env_id=env_id, command="cat a.txt")
        )
        assert step.output == "hi"
        snap = await svc.snapshot_environment(env_pb2.SnapshotEnvironmentRequest(env_id=env_id))
        assert snap.bytes > 0  # declared: works
        local_id = await _create(svc, "local")  # the built-in declares suspend
        await svc.suspend_environment(env_pb2.SuspendEnvironmentRequest(env_id=local_id))
        assert svc._envs[local_id].suspended


async def test_a_dotted_path_needs_no_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN))
    name = "megaflow_tinybox:TinyboxBackend"
    try:
        async with SandboxEnvironmentService(_config(tmp_path)) as svc:
            env_id = await _create(svc, name)
            step = await svc.execute_step(
                env_pb2.ExecuteStepRequest(env_id=env_id, command="cat a.txt")
            )
            assert step.output == "hi"
            assert svc._envs[env_id].spec.backend == name
    finally:
        BACKENDS._loaded.pop(name, None)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"backends": {"tinybox": {"memory_mb": 5}}}, "bad tinybox backend config: memory_mb"),
        ({"backends": {"tinybox": {"pids": 2}}}, "bad tinybox backend config: pids"),
        ({"default_backend": "vm"}, "unknown sandbox backend 'vm'"),
    ],
)
async def test_bad_backend_settings_stop_the_service_at_start(
    tinybox: ModuleType, tmp_path: Path, overrides: dict[str, object], complaint: str
) -> None:
    svc = SandboxEnvironmentService(_config(tmp_path, **overrides))
    with pytest.raises(InvalidRequestError, match=complaint):
        await svc.start()
    await svc.stop()
