"""Least privilege and default disk quotas of Docker and gVisor sandboxes, from inside:
capabilities, no-new-privileges, a non-root user, seccomp denials, and the default
/workspace and /tmp quotas (size and inodes: ENOSPC at the limit, the host unaffected).

The arena's service asks for no quota per task: what applies is the docker backend's
default (`conftest.WORKSPACE_MIB`, `TMP_MIB`, `INODES`)."""

from __future__ import annotations

import shutil

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.docker.backend import DockerBackendConfig
from megaflow.env.docker.hardening import DEFAULT_USER, DiskQuota
from megaflow.v1 import common_pb2
from tests.security.conftest import INODES, TMP_MIB, WORKSPACE_MIB, Arena, failed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.only_backends("docker", "gvisor", reason="Docker's hardening and quotas"),
]

ENOSPC = "No space left on device"


def _status(output: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in output.splitlines() if ":\t" in line)


async def test_runs_as_non_root_without_capabilities(arena: Arena) -> None:
    r = await arena.step("id -u; id -g; grep Cap /proc/self/status")
    assert r.exit_code == 0, r.output
    uid, gid = r.output.splitlines()[:2]
    assert f"{uid}:{gid}" == DEFAULT_USER, r.output
    status = _status(r.output)
    for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):  # gVisor shows no CapAmb
        assert int(status.get(field, "0"), 16) == 0, r.output
    assert "CapEff" in status, r.output
    await arena.assert_contained()


async def test_root_only_tools_refused(arena: Arena) -> None:
    r = await arena.step(
        "chown 0 /workspace; mknod /workspace/d b 254 0; echo x > /etc/pwned; "
        f"touch /{arena.pwn}; su -c id root </dev/null"
    )
    assert failed(r)
    assert r.output.count("Permission denied") + r.output.count("Operation not permitted") >= 3
    await arena.assert_contained()


async def test_setuid_binary_gains_nothing(arena: Arena) -> None:
    """no-new-privileges: even an image's setuid-root binary runs without root."""
    r = await arena.step(
        "cp /bin/bash /workspace/rootsh && chmod 4755 /workspace/rootsh && "
        "/workspace/rootsh -p -c 'id -u; grep CapEff /proc/self/status'"
    )
    lines = r.output.splitlines()
    assert lines and lines[0] == DEFAULT_USER.split(":")[0], r.output
    assert int(_status(r.output)["CapEff"], 16) == 0, r.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "program",
    [
        # unshare(CLONE_NEWUSER): a user namespace would hand back every capability.
        "import os; os.unshare(os.CLONE_NEWUSER)",
        # mount needs CAP_SYS_ADMIN and is not in the allowlist.
        "import ctypes; l=ctypes.CDLL(None, use_errno=True); "
        "assert l.mount(b'x', b'/tmp', b'tmpfs', 0, None) == 0, ctypes.get_errno()",
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING): keyrings are not namespaced.
        "import ctypes; l=ctypes.CDLL(None, use_errno=True); "
        "assert l.syscall(250, 0, -4, 0) >= 0, ctypes.get_errno()",
    ],
    ids=["unshare_user", "mount", "keyctl"],
)
async def test_seccomp_denials(arena: Arena, program: str) -> None:
    r = await arena.step(f'python3 -c "{program}"')
    assert failed(r), r.output
    assert "Error" in r.output or "errno" in r.output.lower() or "Traceback" in r.output
    await arena.assert_contained()


@pytest.mark.only_backends(
    "docker",
    reason="gVisor serves system calls in its Sentry: the OCI seccomp profile is not applied "
    "there (this runsc has no --oci-seccomp), io_uring_setup is the Sentry's own code and "
    "never reaches the host kernel",
)
async def test_seccomp_denies_io_uring(arena: Arena) -> None:
    """io_uring_setup: outside MegaFlow's allowlist (Docker's default profile allows it)."""
    program = (
        "import ctypes; l=ctypes.CDLL(None, use_errno=True); p=ctypes.create_string_buffer(120); "
        "r=l.syscall(425, 1, p); print('rc', r, 'errno', ctypes.get_errno())"
    )
    r = await arena.step(f'python3 -c "{program}"')
    assert r.output.split() == ["rc", "-1", "errno", "1"], r.output  # EPERM
    await arena.assert_contained()


@pytest.mark.parametrize("folder", ["/workspace", "/tmp"])
async def test_default_quota_stops_2gib(arena: Arena, folder: str) -> None:
    free_before = shutil.disk_usage("/").free
    r = await arena.step(
        f"dd if=/dev/zero of={folder}/fill bs=1M count=2048; echo rc=$?; "
        f"du -m {folder}/fill | cut -f1",
        timeout_s=60.0,
    )
    assert ENOSPC in r.output, r.output
    lines = r.output.splitlines()
    assert "rc=1" in lines, r.output
    limit = WORKSPACE_MIB if folder == "/workspace" else TMP_MIB
    assert int(lines[-1]) <= limit, r.output
    # The host's disk did not take the write (tmpfs: memory of the sandbox's cgroup).
    assert free_before - shutil.disk_usage("/").free < 256 * 1024 * 1024
    again = await arena.step(
        f"rm {folder}/fill && echo freed > {folder}/after && cat {folder}/after"
    )
    assert again.output.strip().endswith("freed"), again.output
    await arena.assert_contained()


@pytest.mark.hole_on(
    "gvisor",
    reason="this runsc (20221219) ignores tmpfs nr_inodes and does not count inodes to the "
    "size: 200,000 empty files exhaust the Sentry's memory and the sandbox dies (a timeout, "
    "then a restarted sandbox), instead of ENOSPC",
)
@pytest.mark.parametrize("folder", ["/workspace", "/tmp"])
async def test_default_quota_stops_200000_files(arena: Arena, folder: str) -> None:
    program = (
        "import os, sys\n"
        "n = 0\n"
        "try:\n"
        "    for n in range(200_000):\n"
        f"        open(f'{folder}/f{{n}}', 'w').close()\n"
        "except OSError as e:\n"
        "    print('stopped', n, e.strerror)\n"
        "    sys.exit(1)\n"
        "print('created all')\n"
    )
    r = await arena.step(f"python3 -c {program!r}".replace("\\n", "\n"), timeout_s=30.0)
    assert failed(r) and "created all" not in r.output, r.output
    assert ENOSPC in r.output, r.output
    assert int(r.output.split()[1]) <= INODES, r.output
    await arena.step(f"find {folder} -name 'f*' -delete", timeout_s=60.0)
    await arena.assert_contained()


async def test_task_quota_overrides_the_default(arena: Arena) -> None:
    arena.attacker = await arena.create(owner="quota", limits=common_pb2.EnvLimits(disk_mib=8))
    r = await arena.step("dd if=/dev/zero of=fill bs=1M count=64; du -m fill | cut -f1")
    assert ENOSPC in r.output and int(r.output.splitlines()[-1]) <= 8, r.output
    await arena.assert_contained()


def test_quota_is_never_unlimited_by_omission() -> None:
    config = DockerBackendConfig()
    assert config.workspace_mib > 0 and config.tmp_mib > 0 and config.inodes > 0
    with pytest.raises(InvalidRequestError, match="never unlimited"):
        DiskQuota(workspace_mib=0)
