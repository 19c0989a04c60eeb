"""What a sandbox leaves on the host's disk must not give an unprivileged host user
anything: a setuid-root binary planted in /workspace is checked from the host, as
``nobody``, under a sandbox root laid out like the default one (/tmp/megaflow/...,
world-traversable folders), not the test's private tmp folder."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.v1 import common_pb2, env_pb2
from tests.security import hoststate
from tests.security.conftest import Arena

pytestmark = [
    pytest.mark.integration,
    pytest.mark.only_backends(
        "local",
        reason="checks the local backend's host workspace folders under a root_dir laid out "
        "like the default one; Docker's equivalent (a setuid file in a container layer, "
        "checked as nobody) is test_docker.py::test_setuid_file_in_layer_gives_host_user_nothing",
    ),
]

# Fixed: root_dir and every sandbox folder are 0700, so nobody cannot reach the file.
SETUID_HOLE = (
    "HOLE: the workspace is a host folder on the host's (suid-capable) filesystem and the "
    "sandbox is uid 0, so `chmod 4755` of a copied shell leaves a setuid-root binary on "
    "the host; any unprivileged host user who can traverse the sandbox root (the default "
    "/tmp/megaflow/sandboxes is 0755) runs it and is root. Fix (src/megaflow/env/local/"
    "sandbox.py + service/pool): create root_dir and each sandbox folder with mode 0700, "
    "and put every workspace on a nosuid,nodev mount (a nosuid bind of the folder onto "
    "itself when no disk quota is asked; the quota tmpfs already is nosuid,nodev)."
)


# Without capabilities, so that the path lookup itself happens as an unprivileged user.
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")


@pytest.fixture
async def exposed_service(arena: Arena) -> AsyncIterator[SandboxEnvironmentService]:
    base = Path("/tmp") / f"megaflow-sectest-{secrets.token_hex(6)}"
    service = SandboxEnvironmentService(
        EnvServiceConfig(
            root_dir=base / "sandboxes",
            max_environments=2,
            memory_mib=128,
            pids=64,
            artifact_dir=base / "artifacts",
        )
    )
    try:
        await service.start()
        yield service
        await service.stop()
        assert not hoststate.mounts_under(base), "a workspace mount outlived the service"
    finally:
        await service.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _plant_setuid_shell(service: SandboxEnvironmentService, disk_mib: int) -> list[Path]:
    env_id = (
        await service.create_environment(
            env_pb2.CreateEnvironmentRequest(
                owner="attacker", limits=common_pb2.EnvLimits(disk_mib=disk_mib)
            )
        )
    ).env_id
    r = await service.execute_step(
        env_pb2.ExecuteStepRequest(
            env_id=env_id, command="cp /bin/bash rootsh && chmod 4755 rootsh", timeout_s=10
        )
    )
    assert r.exit_code == 0, r.output
    return list(service.config.root_dir.glob("*/workspace/rootsh"))


def _run_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOBODY, "/bin/sh", "-c", f"'{path}' -p -c 'id -u'"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


async def test_setuid_binary_in_workspace_without_quota(
    arena: Arena, exposed_service: SandboxEnvironmentService
) -> None:
    planted = await _plant_setuid_shell(exposed_service, disk_mib=0)
    assert len(planted) == 1
    run = _run_as_nobody(planted[0])
    # Either it ran without its setuid bit (as nobody) or nobody could not reach it.
    assert run.stdout.strip() in ("65534", ""), "an unprivileged host user became root"
    await arena.assert_contained()


async def test_setuid_binary_in_quota_workspace(
    arena: Arena, exposed_service: SandboxEnvironmentService
) -> None:
    planted = await _plant_setuid_shell(exposed_service, disk_mib=32)
    assert len(planted) == 1
    run = _run_as_nobody(planted[0])
    # Either it ran without its setuid bit (as nobody) or nobody could not reach it.
    assert run.stdout.strip() in ("65534", ""), "an unprivileged host user became root"
    await arena.assert_contained()
