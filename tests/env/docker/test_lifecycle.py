"""DockerSandbox life: suspend/resume, snapshot/restore, stop, orphan reclaim (real dockerd)."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from megaflow.core.errors import SandboxError
from megaflow.env.docker import DockerEngine, DockerSandbox, reclaim_orphan_containers
from megaflow.env.docker.hardening import DEFAULT_TMP_MIB, DEFAULT_WORKSPACE_MIB
from megaflow.env.docker.orphans import LABEL_OWNER_PID, LABEL_SANDBOX_ID, owner_labels
from megaflow.testing.dockerd import Dockerd
from tests.env.docker.conftest import IMAGE, Factory

pytestmark = pytest.mark.integration


def upper_file(dockerd: Dockerd, sandbox: DockerSandbox, path: str) -> Path:
    """A container file as the host sees it (runc containers): through the container
    init's root (/workspace is a tmpfs in the container's mount namespace)."""
    with dockerd.api() as api:
        info = api.inspect_container(sandbox.container_name)
    return Path(f"/proc/{info['State']['Pid']}/root") / path.lstrip("/")


async def test_suspend_freezes_and_resume_continues(
    dockerd: Dockerd, sandbox: DockerSandbox
) -> None:
    await sandbox.execute(
        "(while :; do echo tick >> /workspace/ticks; sleep 0.05; done) >/dev/null 2>&1 &", 10
    )
    ticks = upper_file(dockerd, sandbox, "/workspace/ticks")
    await asyncio.sleep(0.5)
    await sandbox.suspend()
    frozen = ticks.stat().st_size
    await asyncio.sleep(1.0)
    assert ticks.stat().st_size == frozen  # no progress while paused
    with dockerd.api() as api:
        assert api.inspect_container(sandbox.container_name)["State"]["Paused"]
    await sandbox.resume()
    await asyncio.sleep(0.5)
    assert ticks.stat().st_size > frozen
    await sandbox.suspend()  # a call on a suspended sandbox resumes it first
    assert (await sandbox.execute("echo awake", 10)).output == "awake\n"


async def test_snapshot_restores_into_a_new_sandbox(make_sandbox: Factory) -> None:
    first: DockerSandbox = await make_sandbox()
    await first.put_files({"src/app.py": b"print('hi')\n", "data.bin": bytes(range(256))})
    await first.execute("chmod +x src/app.py && ln -s src/app.py link && mkdir -p empty", 10)
    archive = await first.snapshot()
    names = set(tarfile.open(fileobj=io.BytesIO(archive)).getnames())
    assert {"./src/app.py", "./data.bin", "./link", "./empty"} <= names
    second: DockerSandbox = await make_sandbox()
    await second.write_file("stale.txt", b"must disappear")
    await second.restore(archive)
    assert await second.read_file("data.bin") == bytes(range(256))
    r = await second.execute("ls -A; test -x src/app.py && readlink link", 10)
    assert r.output.split() == ["data.bin", "empty", "link", "src", "src/app.py"]


async def test_stop_removes_the_container_and_is_idempotent(
    dockerd: Dockerd, engine: DockerEngine
) -> None:
    sb = DockerSandbox("stopme", engine=engine, image=IMAGE)
    await sb.start()
    await sb.execute("sleep 300 &", 10)
    await sb.stop()
    await sb.stop()
    assert not sb.alive
    with dockerd.api() as api:
        left = api.containers(all=True, filters={"name": sb.container_name})
    assert left == []
    with pytest.raises(SandboxError, match="not running"):
        await sb.execute("echo", 10)


async def test_stop_during_a_command_ends_it(engine: DockerEngine) -> None:
    sb = DockerSandbox("midway", engine=engine, image=IMAGE)
    await sb.start()
    running = asyncio.create_task(sb.execute("sleep 60", 120))
    await asyncio.sleep(0.3)
    await sb.stop()
    with pytest.raises(SandboxError):
        await running


async def test_reclaim_removes_only_containers_of_dead_owners(dockerd: Dockerd) -> None:
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    with dockerd.api() as api:
        dead_labels = {**owner_labels("orphan"), LABEL_OWNER_PID: str(gone.pid)}
        orphan = api.create_container(IMAGE, ["sleep", "300"], labels=dead_labels)["Id"]
        mine = api.create_container(IMAGE, ["sleep", "300"], labels=owner_labels("mine"))["Id"]
        unrelated = api.create_container(IMAGE, ["sleep", "300"])["Id"]
        for container in (orphan, mine, unrelated):
            api.start(container)
        try:
            assert await asyncio.to_thread(reclaim_orphan_containers, api) == 1
            ids = {c["Id"] for c in api.containers(all=True)}
            assert orphan not in ids and {mine, unrelated} <= ids
            labels = api.inspect_container(mine)["Config"]["Labels"]
            assert labels[LABEL_SANDBOX_ID] == "mine"
        finally:
            for container in (orphan, mine, unrelated):
                try:
                    api.remove_container(container, force=True)
                except Exception:
                    pass


async def test_container_config_carries_limits_and_labels(
    dockerd: Dockerd, make_sandbox: Factory
) -> None:
    sb: DockerSandbox = await make_sandbox(memory_mib=96, pids=50, cpu_shares=512)
    with dockerd.api() as api:
        info = api.inspect_container(sb.container_name)
    host = info["HostConfig"]
    # The workload's memory plus its tmpfs quotas (default sizes).
    limit = (96 + DEFAULT_WORKSPACE_MIB + DEFAULT_TMP_MIB) * 1024 * 1024
    assert host["Memory"] == host["MemorySwap"] == limit
    assert (host["PidsLimit"], host["CpuShares"], host["NetworkMode"]) == (50, 512, "none")
    assert host["Runtime"] == "runc" and host["Init"] is True
    labels = info["Config"]["Labels"]
    assert labels[LABEL_SANDBOX_ID] == sb.sandbox_id and labels[LABEL_OWNER_PID] == str(os.getpid())
    assert info["Config"]["WorkingDir"] == "/workspace" == sb.workdir


async def test_a_container_killed_from_outside_is_started_again(
    dockerd: Dockerd, sandbox: DockerSandbox
) -> None:
    await sandbox.write_file("kept.txt", b"kept")
    with dockerd.api() as api:
        api.kill(sandbox.container_name)
        api.wait(sandbox.container_name, timeout=30)
    # The first call finds the shell gone (before or under its command) and starts it all again.
    r = await sandbox.execute("echo first", 30)
    assert "a new shell was started" in r.output
    assert "start empty" in r.output  # the tmpfs quota mounts did not survive: said so
    r = await sandbox.execute("cat kept.txt; pwd", 30)
    assert "No such file" in r.output and r.output.endswith("/workspace\n"), r.output
    assert sandbox.alive


async def test_docker_calls_do_not_wait_for_the_default_thread_pool(
    make_sandbox: Factory,
) -> None:
    """The engine runs the docker SDK on its own pool: with every thread of asyncio's
    default pool blocked (as by long image extractions), a sandbox still starts and runs."""
    release = threading.Event()
    loop = asyncio.get_running_loop()
    hogs = [loop.run_in_executor(None, release.wait) for _ in range(64)]  # > any default size
    try:
        async with asyncio.timeout(120):  # a hang guard: on the shared pool this never ends
            sandbox = await make_sandbox()
            result = await sandbox.execute("echo hi", 10)
        assert result.output == "hi\n" and result.exit_code == 0
    finally:
        release.set()
        await asyncio.gather(*hogs)
