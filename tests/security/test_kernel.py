"""Hostile actions against the kernel: mounts, modules, sysctls, hostname, keyrings,
namespaces, devices, cgroups, the service's environment, the clock and reboot.

Probes that would change the shared host if they succeeded are written to change
nothing even then: sysctls are written with their current value, `reboot` asks only
to turn Ctrl-Alt-Del off, the clock is set to the time it already has.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security import hoststate
from tests.security.conftest import (
    Arena,
    failed,
    memory_limit_bytes,
    pids_limit,
)

pytestmark = pytest.mark.integration

# Found by this battery on 2026-11-24 and fixed in megaflow.env.local (bwrap.py,
# process.py, seccomp.py); these tests keep the fixes in place:
# - /proc/sys was writable (real root needs no capability for most sysctls: core_pattern
#   would have given host root code execution) -> read-only bind of /proc/sys;
# - /proc/1/environ (the outer bwrap) showed the service's environment -> minimal env;
# - kernel keyrings were shared with the host's root and every sandbox -> seccomp;
# - user namespaces could be created, handing back every capability -> seccomp.


@pytest.mark.parametrize(
    "command",
    [
        "mount -t tmpfs none /tmp",
        "mount --bind /workspace /tmp",
        "mount -t proc proc /tmp",
        "mount -o remount,rw /",
        "mount -o remount,rw /etc",
        "mount -o remount,rw,suid /workspace",
        "mount -t cgroup -o memory cgroup /tmp",
        "mount -t overlay overlay -o lowerdir=/etc,upperdir=/tmp/u,workdir=/tmp/w /etc",
        "umount -l /proc",
        "umount -l /etc/shadow",
    ],
    ids=[
        "tmpfs",
        "bind",
        "proc",
        "remount_rw_root",
        "remount_rw_etc",
        "remount_suid_workspace",
        "cgroup",
        "overlay",
        "umount_proc",
        "unmask_shadow",
    ],
)
async def test_mount(arena: Arena, command: str) -> None:
    # util-linux by full path: Docker's busybox sh would run its own applet instead.
    r = await arena.step(f"mkdir -p /tmp/u /tmp/w; /usr/bin/{command}")
    assert failed(r)
    refusals = ["permission denied", "must be superuser"]
    if arena.docker:  # util-linux's umount, non-root: the target is no user mount of fstab
        refusals.append("No such file or directory")
    assert any(refusal in r.output for refusal in refusals), r.output
    after = await arena.step("grep -c . /proc/self/mounts; test ! -s /etc/shadow")
    assert after.exit_code == 0, after.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "/usr/sbin/insmod /tmp/x.ko",
        "/usr/sbin/modprobe dummy",
        "python3 -c 'import ctypes,sys; "
        'r=ctypes.CDLL(None).syscall(175, b"\\0"*64, 64, b""); sys.exit(r != 0)\'',
        'python3 -c \'import ctypes,os,sys; fd=os.open("/usr/bin/true", os.O_RDONLY); '
        'r=ctypes.CDLL(None).syscall(313, fd, b"", 0); sys.exit(r != 0)\'',
    ],
    ids=["insmod", "modprobe", "init_module_ctypes", "finit_module_ctypes"],
)
async def test_load_kernel_module(arena: Arena, command: str) -> None:
    r = await arena.step(f"head -c 4096 /dev/urandom > /tmp/x.ko; {command}")
    assert failed(r)
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "echo {pwn} > /proc/sys/kernel/hostname",
        "echo 4 > /proc/sys/vm/drop_caches",  # 4: only silences the log, drops nothing
        "cat /proc/sys/kernel/pid_max > /proc/sys/kernel/pid_max",
        "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern",
        "/usr/sbin/sysctl -w vm.overcommit_memory=$(cat /proc/sys/vm/overcommit_memory)",
    ],
    ids=["kernel_hostname", "vm_drop_caches", "pid_max", "core_pattern", "sysctl_w"],
)
async def test_write_proc_sys(arena: Arena, command: str) -> None:
    r = await arena.step(command.format(pwn=arena.pwn))
    assert failed(r), f"a /proc/sys write succeeded: {r.output}"
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "hostname {pwn}",
        "domainname {pwn}",
        "python3 -c 'import socket; socket.sethostname(\"{pwn}\")'",
    ],
    ids=["hostname", "domainname", "sethostname"],
)
async def test_change_hostname(arena: Arena, command: str) -> None:
    r = await arena.step(command.format(pwn=arena.pwn))
    assert failed(r)
    assert "not permitted" in r.output or "must be root" in r.output, r.output
    await arena.assert_contained()


@pytest.mark.skipif(not hoststate.X86_64, reason="syscall numbers are x86_64's")
async def test_add_key_to_shared_keyring(arena: Arena) -> None:
    r = await arena.step(
        "python3 -c 'import ctypes,sys; r=ctypes.CDLL(None).syscall("
        f'248, b"user", b"{arena.pwn}", b"x", 1, -4); sys.exit(r < 0)\''
    )
    assert failed(r), "add_key into the user keyring succeeded"
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "unshare -r id",
        "unshare -m true",
        "unshare -n true",
        "unshare -p -f true",
        "nsenter -t 1 -m",
    ],
    ids=["unshare_r", "unshare_mount", "unshare_net", "unshare_pid", "nsenter"],
)
async def test_create_namespaces(arena: Arena, command: str) -> None:
    r = await arena.step(command)
    assert failed(r)
    # gVisor's /proc has no setgroups or ns files: the tools fail before any system call.
    refused = ("not permitted", "No such file or directory")
    assert any(x in r.output for x in refused[: 2 if arena.backend == "gvisor" else 1]), r.output
    await arena.assert_contained()


async def test_create_user_namespace(arena: Arena) -> None:
    # unshare(CLONE_NEWUSER | CLONE_NEWNS), then mount without exec'ing (exec drops caps).
    r = await arena.step(
        "python3 -c 'import ctypes,sys; c=ctypes.CDLL(None); "
        'r=c.unshare(0x10000000 | 0x00020000) or c.mount(b"none", b"/tmp", b"tmpfs", 0, None); '
        "sys.exit(r != 0)'"
    )
    assert failed(r), "a user namespace was created and its capabilities used to mount"
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "head -c 16 /dev/mem",
        "head -c 16 /dev/kmem",
        "head -c 16 /dev/port",
        "head -c 512 /dev/sda",
        "head -c 512 /dev/vda",
        "head -c 64 /dev/kmsg",
        "head -c 1 /dev/kvm",
        "mknod /workspace/disk b 254 0 && head -c 512 /workspace/disk",
        "mknod /tmp/mem c 1 1 && head -c 16 /tmp/mem",
    ],
    ids=["mem", "kmem", "port", "sda", "vda", "kmsg", "kvm", "mknod_block", "mknod_char"],
)
async def test_device_access(arena: Arena, command: str) -> None:
    r = await arena.step(command)
    assert failed(r)
    await arena.assert_contained()


@pytest.mark.only_backends(
    "local",
    "docker",
    reason="gVisor mounts no cgroupfs inside and its /proc/self/cgroup is its own: its host "
    "cgroup limits are checked by test_docker.py::test_host_cgroup_enforces_limits",
)
async def test_change_own_cgroup_limits(arena: Arena) -> None:
    r = await arena.step("cat /proc/self/cgroup")
    assert r.exit_code == 0
    lines = [line.split(":", 2) for line in r.output.splitlines() if line.count(":") >= 2]
    paths = {ctl: path for _, ctls, path in lines for ctl in (ctls.split(",") or [""])}
    attack = await arena.step(
        arena.bash(
            "ls /sys/fs/cgroup; "
            f"echo max > /sys/fs/cgroup/memory{paths.get('memory', '')}/memory.limit_in_bytes; "
            f"echo max > /sys/fs/cgroup/pids{paths.get('pids', '')}/pids.max; "
            f"echo $$ > /sys/fs/cgroup/memory/cgroup.procs"
        )
    )
    assert failed(attack)
    # local: no cgroupfs in the sandbox; Docker: its cgroupfs is mounted read-only.
    denial = "No such file or directory" if arena.backend == "local" else "Read-only file system"
    assert denial in attack.output, attack.output
    limits = {
        Path(
            "/sys/fs/cgroup/memory", paths.get("memory", "/-").lstrip("/"), "memory.limit_in_bytes"
        ),
        Path("/sys/fs/cgroup/pids", paths.get("pids", "/-").lstrip("/"), "pids.max"),
        Path("/sys/fs/cgroup", paths.get("", "/-").lstrip("/"), "memory.max"),
        Path("/sys/fs/cgroup", paths.get("", "/-").lstrip("/"), "pids.max"),
    }
    if arena.backend == "local":  # its own cgroup namespace: it sees "/", the host's dirs
        assert {path for path in paths.values()} == {"/"}, r.output
        sandbox = arena.service._envs[arena.attacker].sandbox  # type: ignore[attr-defined]
        limits = {
            d / name
            for d in sandbox._cgroups.dirs
            for name in ("memory.limit_in_bytes", "pids.max", "memory.max")
        }
    checked = {p.name: p.read_text().strip() for p in limits if p.is_file()}
    assert checked, f"no cgroup limit file found on the host for {paths}"
    expected = {str(memory_limit_bytes(arena.backend)), str(pids_limit(arena.backend))}
    assert set(checked.values()) <= expected, checked
    await arena.assert_contained()


async def test_service_environment_hidden_from_shell(arena: Arena) -> None:
    r = await arena.step(
        f"env; cat /proc/self/environ /proc/2/environ | tr '\\0' '\\n'; "
        f"env | grep -q {arena.env_secret}"
    )
    assert failed(r)
    assert arena.env_secret not in r.output
    await arena.assert_contained()


async def test_service_environment_hidden_from_proc_1(arena: Arena) -> None:
    r = await arena.step("tr '\\0' '\\n' < /proc/1/environ")
    assert arena.env_secret not in r.output, "the service's secret env var leaks into the sandbox"
    read = await arena.read("/proc/1/environ")
    assert arena.env_secret.encode() not in read.content
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "python3 -c 'import time; time.clock_settime(time.CLOCK_REALTIME, time.time())'",
        "python3 -c 'import ctypes,sys; "
        "sys.exit(ctypes.CDLL(None).reboot(0) != 0)'",  # LINUX_REBOOT_CMD_CAD_OFF
    ],
    ids=["set_clock", "reboot_cad_off"],
)
async def test_privileged_syscalls(arena: Arena, command: str) -> None:
    r = await arena.step(command)
    assert failed(r)
    await arena.assert_contained()


INT80 = """
import ctypes, mmap, sys
code = bytes.fromhex(sys.argv[1])
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
r = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
print("returned", r)
sys.exit(r < 0)
"""
"""Runs machine code given in hex (an i386 system call through ``int 0x80``)."""


@pytest.mark.skipif(not hoststate.X86_64, reason="x86_64 machine code and syscall numbers")
@pytest.mark.parametrize(
    "how",
    [
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0): reads, changes nothing
        "python3 -c 'import ctypes,sys; sys.exit(ctypes.CDLL(None).syscall(250, 0, -4, 0) < 0)'",
        "python3 -c 'import ctypes,sys; "
        "sys.exit(ctypes.CDLL(None).syscall(0x40000000 | 250, 0, -4, 0) < 0)'",
        # push rbx; mov eax, 288 (i386 keyctl); ebx=0; ecx=-4; edx=0; int 0x80; pop rbx; ret
        "python3 int80.py 53b820010000bb00000000b9fcffffffba00000000cd805bc3",
        # push rbx; mov eax, 310 (i386 unshare); ebx=CLONE_NEWUSER; int 0x80; pop rbx; ret
        "python3 int80.py 53b836010000bb00000010cd805bc3",
    ],
    ids=["keyctl_native", "keyctl_x32_abi", "keyctl_i386_int80", "unshare_userns_i386_int80"],
)
async def test_bypass_syscall_filter(arena: Arena, how: str) -> None:
    assert (await arena.write("int80.py", INT80.encode())).ok
    r = await arena.step(how)
    assert failed(r), f"the system call went through: {r.output}"
    await arena.assert_contained()
