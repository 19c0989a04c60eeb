"""Docker's own containment mechanisms (runc and gVisor), checked from the host: what
`docker inspect` says of the attacker's container (no network, no-new-privileges,
capabilities, seccomp, a non-root user, quota tmpfs mounts, limits, no host mounts, not
privileged), what the host's cgroup files enforce, and that a setuid file the sandbox
leaves behind gives an unprivileged host user nothing (the Docker equivalent of
test_host_exposure.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from megaflow.env.docker.hardening import CAPABILITIES, DEFAULT_USER
from tests.security import hoststate
from tests.security.backends import RUNTIMES, sandbox_containers
from tests.security.conftest import (
    INODES,
    TMP_MIB,
    WORKSPACE_MIB,
    Arena,
    memory_limit_bytes,
    pids_limit,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.only_backends("docker", "gvisor", reason="Docker's own mechanisms"),
]

CAP_SYS_ADMIN = 21
# Without capabilities, so that the path lookup itself happens as an unprivileged user.
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")


def _attacker(arena: Arena) -> dict[str, Any]:
    assert arena.dockerd is not None
    (info,) = [
        c for c in sandbox_containers(arena.dockerd) if c["Id"] == arena.containers["attacker"]
    ]
    assert info["Config"]["Labels"].get(hoststate.DOCKER_SANDBOX_LABEL)
    return info


async def test_container_settings(arena: Arena) -> None:
    info = _attacker(arena)
    host = info["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert info["Config"].get("NetworkDisabled") is True
    options = host["SecurityOpt"] or []
    assert "no-new-privileges" in options
    (seccomp,) = [o for o in options if o.startswith("seccomp=")]
    assert '"defaultAction": "SCMP_ACT_ERRNO"' in seccomp  # MegaFlow's own allowlist
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == sorted(CAPABILITIES)
    assert not host["Devices"] and not host["Binds"]
    assert info["Mounts"] == [], "a host folder is mounted into the sandbox"
    assert info["Config"]["User"] == DEFAULT_USER
    tmpfs = host["Tmpfs"]
    assert set(tmpfs) == {"/workspace", "/tmp"}, tmpfs
    assert f"size={WORKSPACE_MIB}m" in tmpfs["/workspace"] and f"size={TMP_MIB}m" in tmpfs["/tmp"]
    assert all(f"nr_inodes={INODES}" in o and "nosuid" in o for o in tmpfs.values())
    assert host["Memory"] == host["MemorySwap"] == memory_limit_bytes(arena.backend)
    assert host["PidsLimit"] == pids_limit(arena.backend)
    assert host["Runtime"] == RUNTIMES[arena.backend]
    assert host["PidMode"] in ("", "private") and host["IpcMode"] in ("private", "shareable")
    assert host["UTSMode"] == "" and host["UsernsMode"] == ""
    r = await arena.step("id -u; grep -e NoNewPrivs -e Cap /proc/self/status; ip -o link")
    assert r.output.splitlines()[0] == DEFAULT_USER.split(":")[0], r.output
    status = dict(line.split(":\t") for line in r.output.splitlines() if ":\t" in line)
    if arena.backend == "docker":  # gVisor's /proc does not show NoNewPrivs
        assert status["NoNewPrivs"] == "1", r.output
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0, r.output
    assert not int(status["CapBnd"], 16) & (1 << CAP_SYS_ADMIN), r.output
    links = [line.split(":")[1].strip() for line in r.output.splitlines() if ": " in line]
    assert links == ["lo"], r.output  # no interface but loopback
    await arena.assert_contained()


async def test_host_cgroup_enforces_limits(arena: Arena) -> None:
    """The attacker's processes, found on the host by their container's cgroup, sit in
    cgroups whose limits are the sandbox's."""
    pids = hoststate.cgroup_pids(arena.containers["attacker"])
    assert pids, "no host process in the attacker's cgroup"
    lines = Path(f"/proc/{pids[0]}/cgroup").read_text().splitlines()
    paths = {c: p for _, cs, p in (line.split(":", 2) for line in lines) for c in cs.split(",")}
    limits = {
        Path(
            "/sys/fs/cgroup/memory", paths.get("memory", "/-").lstrip("/"), "memory.limit_in_bytes"
        ),
        Path("/sys/fs/cgroup/pids", paths.get("pids", "/-").lstrip("/"), "pids.max"),
        Path("/sys/fs/cgroup", paths.get("", "/-").lstrip("/"), "memory.max"),
        Path("/sys/fs/cgroup", paths.get("", "/-").lstrip("/"), "pids.max"),
    }
    checked = {p.name: p.read_text().strip() for p in limits if p.is_file()}
    assert len(checked) == 2, (paths, checked)
    expected = {str(memory_limit_bytes(arena.backend)), str(pids_limit(arena.backend))}
    assert set(checked.values()) == expected, checked
    assert arena.victim.daemon_pid not in pids, "the victim shares the attacker's cgroup"
    await arena.assert_contained()


@pytest.mark.only_backends(
    "docker",
    reason="the host path of a file in a runc container's tmpfs; gVisor's tmpfs "
    "is its Sentry's memory, with no host path at all",
)
async def test_setuid_file_in_workspace_gives_host_user_nothing(arena: Arena) -> None:
    r = await arena.step("cp /bin/bash /workspace/rootsh && chmod 4755 /workspace/rootsh")
    assert r.exit_code == 0, r.output
    info = _attacker(arena)
    planted = Path(f"/proc/{info['State']['Pid']}/root/workspace/rootsh")
    assert planted.is_file() and planted.stat().st_uid != 0  # setuid to the sandbox user
    run = _run_as_nobody(planted)
    # Either it ran without its setuid bit (as nobody) or nobody could not reach it.
    assert run.stdout.strip() in ("65534", ""), "an unprivileged host user became root"
    await arena.assert_contained()


def _run_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOBODY, "/bin/sh", "-c", f"'{path}' -p -c 'id -u'"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
