"""Hostile filesystem actions through ExecuteStep: read host secrets, write the host,
link or climb out of the sandbox, gain privileges through setuid binaries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.security.conftest import DENIED, Arena, failed

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("where", ["test_tmp_dir", "root_home"])
async def test_read_secret_planted_on_host(arena: Arena, where: str) -> None:
    path = arena.secret_file if where == "test_tmp_dir" else arena.root_secret
    r = await arena.step(f"cat {path}")
    assert failed(r)
    assert "No such file or directory" in r.output or "can't open" in r.output, r.output
    assert arena.secret.decode().strip() not in r.output
    listing = await arena.step(f"ls -la {path.parent}")
    assert path.name not in listing.output and arena.secret.decode() not in listing.output
    if arena.backend == "local" or path.parent != Path("/root"):
        assert failed(listing)  # no such folder (Docker's image has its own empty /root)
    await arena.assert_contained()


async def test_search_whole_tree_for_secret(arena: Arena) -> None:
    token = arena.secret.decode().strip()
    r = await arena.step(
        "find / \\( -path /proc -o -path /sys \\) -prune -o "
        "\\( -name secret.txt -o -name '.megaflow-secret-*' \\) "
        f"-print 2>/dev/null | grep . || /usr/bin/grep -rIl -- {token} "
        "/workspace /tmp /dev /.megaflow /root /work /home /var 2>/dev/null",
        timeout_s=30,
    )
    assert failed(r), f"the secret was found inside: {r.output}"
    assert r.output == ""
    await arena.assert_contained()


async def test_read_secret_through_proc_root_links(arena: Arena) -> None:
    r = await arena.step(
        f"cat /proc/1/root{arena.secret_file} /proc/1/cwd{arena.root_secret} "
        f"/proc/self/root{arena.secret_file}"
    )
    assert failed(r)
    assert arena.secret.decode().strip() not in r.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "folder",
    [
        "/",
        "/etc",
        "/usr",
        "/usr/bin",
        "/usr/local/bin",
        "/opt",
        "/bin",
        "/lib",
        "/root",
        "/work",
        "/var/tmp",
        "/home",
        "/mnt",
        "/proc",
        "/.megaflow/inbox",
        "host_tmp_dir",
    ],
)
async def test_write_to_host_path(arena: Arena, folder: str) -> None:
    target = arena.host_dir if folder == "host_tmp_dir" else Path(folder)
    r = await arena.step(f"echo pwned > {target}/{arena.pwn}")
    if arena.docker and not failed(r):
        # Docker's root filesystem is the container's own copy-on-write layer.
        await arena.assert_written_privately(f"{target}/{arena.pwn}")
    else:
        assert failed(r)
        assert any(m in r.output for m in DENIED), r.output
    await arena.assert_contained()


async def test_private_tmp_and_shm_are_not_the_hosts(arena: Arena) -> None:
    r = await arena.step(f"echo pwned > /tmp/{arena.pwn} && echo pwned > /dev/shm/{arena.pwn}")
    assert r.exit_code == 0, r.output  # allowed: both are private to the sandbox
    assert not os.path.lexists(f"/tmp/{arena.pwn}")
    assert not os.path.lexists(f"/dev/shm/{arena.pwn}")
    seen = await arena.step(
        f"cat /tmp/{arena.pwn} /dev/shm/{arena.pwn}", env_id=arena.victim.env_id
    )
    assert failed(seen), "the victim sees the attacker's /tmp"
    await arena.assert_contained()


async def test_hardlink_host_file_into_workspace(arena: Arena) -> None:
    r = await arena.step("ln /etc/hostname /workspace/h && ln /usr/bin/ls /workspace/l")
    assert failed(r)
    assert "Invalid cross-device link" in r.output or "Operation not permitted" in r.output
    await arena.assert_contained()


async def test_reach_victim_workspace_by_host_path(arena: Arena) -> None:
    ws = arena.victim.workspace
    r = await arena.step(f"rm -rf {ws}; cat {ws}/victim.txt; echo pwned > {ws}/victim.txt")
    assert failed(r)
    assert "victim's work" not in r.output
    await arena.assert_contained()


async def test_destroy_own_workspace_mount(arena: Arena) -> None:
    r = await arena.step("cd / && umount -l /workspace; rm -rf /workspace; rmdir /workspace")
    assert failed(r)
    await arena.assert_contained()


async def test_setuid_root_shell_gains_nothing(arena: Arena) -> None:
    r = await arena.step(
        "cp /bin/bash ./rootsh && chmod u+s ./rootsh && "
        "./rootsh -p -c 'grep CapEff /proc/self/status; mount -t tmpfs x /tmp'"
    )
    assert failed(r)
    if arena.backend == "local":
        assert "CapEff:\t0000000000000000" in r.output
    else:  # the setuid bit adds nothing to the sandbox user's own (empty) capabilities
        own = await arena.step("grep -e CapEff -e NoNewPrivs /proc/self/status")
        cap_eff, *no_new_privs = own.output.splitlines()
        assert cap_eff in r.output.splitlines(), (cap_eff, r.output)
        if arena.backend == "docker":  # gVisor's /proc shows no NoNewPrivs line
            assert no_new_privs[0].split() == ["NoNewPrivs:", "1"], own.output
    assert "permission denied" in r.output or "must be superuser" in r.output, r.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "su -c 'mount -t tmpfs x /tmp'",
        "su nobody -c id",
        "sudo id",
        "/usr/bin/newgrp nogroup </dev/null",
        "setpriv --reuid=0 --inh-caps=+sys_admin --ambient-caps=+sys_admin true",
        "capsh --caps=cap_sys_admin+eip -- -c true",
    ],
    ids=["su", "su_nobody", "sudo", "newgrp", "setpriv_ambient", "capsh"],
)
async def test_privilege_tools_fail(arena: Arena, command: str) -> None:
    r = await arena.step(command)
    assert failed(r), r.output
    await arena.assert_contained()


async def test_masked_shadow_reveals_no_hashes(arena: Arena) -> None:
    r = await arena.step("cat /etc/shadow /etc/gshadow")
    assert failed(r)
    assert "root:" not in r.output
    await arena.assert_contained()


@pytest.mark.only_backends(
    "local",
    reason="the local backend binds the image read-only; a Docker container's root "
    "filesystem is its own copy-on-write layer by design (writes to it are checked to stay "
    "there by test_write_to_host_path and test_image_writes_stay_in_own_layer)",
)
async def test_image_files_are_read_only(arena: Arena) -> None:
    before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    r = await arena.step(
        "echo 'evil::0:0::/:/bin/sh' >> /etc/passwd; chmod 777 /etc/passwd; "
        "touch /usr/bin/ls; rm -f /usr/bin/env"
    )
    assert failed(r)
    # Read-only mounts, and files of the host's root, which the sandbox's unprivileged
    # uid may not write even where its user namespace calls it root.
    denials = r.output.count("Read-only file system") + r.output.count("Permission denied")
    assert denials >= 4, r.output
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    assert Path("/usr/bin/env").exists()
    await arena.assert_contained()


@pytest.mark.only_backends(
    "docker",
    "gvisor",
    reason="the local backend's image is read-only (test_image_files_are_read_only); "
    "a container's root layer is writable, but not by its non-root user",
)
async def test_image_files_not_writable_by_sandbox_user(arena: Arena) -> None:
    before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    r = await arena.step(
        "echo 'evil::0:0::/:/bin/sh' >> /etc/passwd; chmod 777 /etc/passwd; "
        "touch /usr/bin/ls; rm -f /usr/bin/env"
    )
    assert failed(r)
    refused = r.output.count("Permission denied") + r.output.count("Operation not permitted")
    assert refused >= 3, r.output
    assert arena.private_layers_holding("/etc/passwd") == [], "the image's file was copied up"
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    seen = await arena.step(
        "grep -c evil /etc/passwd; test -e /usr/bin/env", env_id=arena.victim.env_id
    )
    assert seen.output.split()[:1] == ["0"] and seen.exit_code == 0, seen.output
    await arena.assert_contained()
