"""The private dockerd helper leaves nothing behind, even after the daemon crashed."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from megaflow.core.errors import SandboxError
from megaflow.env.docker import DockerSandbox
from megaflow.testing.dockerd import Dockerd, build_busybox_image, dockerd_available
from megaflow.testing.mounts import mounts_under
from megaflow.testing.processes import pids_mentioning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(dockerd_available() is not None, reason=str(dockerd_available())),
]


def traces(folder: Path) -> tuple[list[int], list[str]]:
    """Processes whose command line names ``folder``, and mounts under it."""
    pids = list(pids_mentioning(str(folder)))
    return pids, mounts_under(folder)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "after-sigkill"])
async def test_stop_leaves_no_process_mount_or_folder(crash: bool) -> None:
    daemon = Dockerd().start()
    try:
        assert daemon.start_s > 0 and daemon.base_url.startswith("unix://")
        with daemon.api() as api:
            build_busybox_image(api, "megaflow-busybox:stop")
        engine = daemon.engine()
        sb = DockerSandbox("left-running", engine=engine, image="megaflow-busybox:stop")
        await sb.start()
        assert (await sb.execute("echo up", 10)).output == "up\n"
        pids, mounts = traces(daemon.dir)
        assert pids and mounts  # dockerd, containerd, a shim; overlay and netns mounts
        with daemon.api() as api:
            init_pid = api.inspect_container(sb.container_name)["State"]["Pid"]
        dirs = daemon.cgroup_dirs()  # in every hierarchy, also below our own cgroup
        assert dirs
        if crash:
            daemon.crash()
            with pytest.raises(SandboxError, match="unreachable"):  # said, not hidden
                await sb.stop()
            assert not sb.alive
        else:
            await sb.stop()
        engine.close()
    finally:
        daemon.stop()
    assert traces(daemon.dir) == ([], [])
    assert not daemon.dir.exists()
    assert not running(init_pid)  # the container's processes died with it
    assert daemon.cgroup_dirs() == [] and not any(d.exists() for d in dirs)
    assert not list(Path("/sys/fs/cgroup").glob(f"**/{daemon.cgroup_parent}"))  # anywhere
