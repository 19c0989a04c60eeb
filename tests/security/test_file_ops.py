"""Hostile file operations through SubmitAction (read_file, write_file, edit_file) and
CreateEnvironment's files: traversal, absolute paths, NUL bytes, long paths, symlink
escapes, special files, oversized content. Each returns ok=False with a message (or
an InvalidRequestError for a malformed request) and touches nothing on the host."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import env_pb2
from tests.security.conftest import Arena

pytestmark = pytest.mark.integration


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "path",
    [
        "../../{secret}",
        "{secret}",
        "/workspace/../../../../{secret}",
        "{root_secret}",
        "../../../../{root_secret}",
        "/proc/1/root{secret}",
    ],
    ids=["dotdot_tmp", "absolute_tmp", "deep_dotdot", "absolute_root", "dotdot_root", "proc_root"],
)
async def test_read_host_secret(arena: Arena, path: str) -> None:
    target = path.format(secret=arena.secret_file, root_secret=arena.root_secret)
    r = await arena.read(target)
    assert not r.ok and "no such file" in r.message, r.message
    assert arena.secret not in r.content
    await arena.assert_contained()


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "/usr/bin/{pwn}",
        "/{pwn}",
        "/root/{pwn}",
        "/work/{pwn}",
        "/.megaflow/inbox/{pwn}",
        "/proc/sys/kernel/{pwn}",
    ],
    ids=[
        "dotdot_passwd",
        "absolute_passwd",
        "usr_bin",
        "root_of_sandbox",
        "root_home",
        "work",
        "inbox",
        "proc_sys",
    ],
)
async def test_write_outside_workspace(arena: Arena, path: str) -> None:
    passwd = _sha("/etc/passwd")
    target = path.format(pwn=arena.pwn, host_dir=arena.host_dir)
    r = await arena.write(target, b"evil::0:0::/:/bin/sh\n")
    if arena.docker and r.ok:
        # Docker's root filesystem is the container's own copy-on-write layer (the local
        # backend binds the image read-only): the write must have landed there only.
        await arena.assert_written_privately(target)
    else:
        assert not r.ok, r.message
        assert any(
            m in r.message.lower()
            for m in ("read-only", "no such file", "nonexistent directory", "permission denied")
        ), r.message
    assert _sha("/etc/passwd") == passwd
    await arena.assert_contained()


async def test_write_to_host_tmp_path_lands_in_private_tmp(arena: Arena) -> None:
    target = f"../../../..{arena.host_dir}/{arena.pwn}"
    r = await arena.write(target, b"pwned\n")
    assert r.ok, r.message  # allowed: the sandbox's /tmp is its own tmpfs
    assert not (arena.host_dir / arena.pwn).exists()
    seen = await arena.step(f"cat {arena.host_dir}/{arena.pwn}", env_id=arena.victim.env_id)
    assert seen.exit_code != 0
    await arena.assert_contained()


@pytest.mark.parametrize(
    "op",
    ["read_nul", "write_nul", "edit_nul", "read_long", "write_long", "write_long_component"],
)
async def test_malformed_paths(arena: Arena, op: str) -> None:
    nul, long, component = "ok\x00/../../etc/passwd", "a/" * 3000 + "x", "b" * 300
    if op == "read_nul":
        r = await arena.read(nul)
    elif op == "write_nul":
        r = await arena.write(nul, b"x")
    elif op == "edit_nul":
        r = await arena.act(edit_file=env_pb2.EditFile(path=nul, old="a", new="b"))
    elif op == "read_long":
        r = await arena.read(long)
    elif op == "write_long":
        r = await arena.write(long, b"x")
    else:
        r = await arena.write(component, b"x")
    assert not r.ok and r.message, r.message
    await arena.assert_contained()


@pytest.mark.parametrize(
    "link_to",
    ["{secret}", "{root_secret}", "/etc/passwd", "/root", "{host_dir}", "{victim_ws}/victim.txt"],
    ids=["host_secret", "root_secret", "image_passwd", "root_dir", "host_dir", "victim_file"],
)
async def test_symlink_escape(arena: Arena, link_to: str) -> None:
    passwd = _sha("/etc/passwd")
    target = link_to.format(
        secret=arena.secret_file,
        root_secret=arena.root_secret,
        host_dir=arena.host_dir,
        victim_ws=arena.victim.workspace,
    )
    r = await arena.step(f"ln -s {target} link && ln -s {target} dirlink")
    assert r.exit_code == 0, r.output
    read = await arena.read("link")
    assert arena.secret not in read.content and b"victim's work" not in read.content
    if target != "/etc/passwd":  # the image's passwd is readable by design
        assert not read.ok, read.message
    for path, lands in (("link", target), (f"dirlink/{arena.pwn}", f"{target}/{arena.pwn}")):
        write = await arena.write(path, b"pwned\n")
        if arena.docker and write.ok:
            # The link resolves inside the container, into its own copy-on-write layer.
            await arena.assert_written_privately(lands)
        else:
            assert not write.ok, write.message
    edit = await arena.act(edit_file=env_pb2.EditFile(path="link", old="root", new="pwned"))
    if arena.docker and edit.ok:
        await arena.assert_written_privately(target)
    else:
        assert not edit.ok, edit.message
    assert _sha("/etc/passwd") == passwd
    await arena.assert_contained()


async def test_symlinks_do_not_redirect_release_cleanup(arena: Arena) -> None:
    keep = arena.host_dir / "keep"
    keep.mkdir()
    (keep / "file").write_bytes(b"keep me")
    r = await arena.step(f"ln -s {keep} dir && ln -s {keep}/file file && mkdir -p d/e")
    assert r.exit_code == 0
    await arena.service.release_environment(
        env_pb2.ReleaseEnvironmentRequest(env_id=arena.attacker)
    )
    assert (keep / "file").read_bytes() == b"keep me"
    arena.attacker = (await arena.service.create_environment(arena.request(owner="again"))).env_id
    await arena.assert_contained()


@pytest.mark.parametrize(
    "path", ["/dev/zero", "/dev/urandom", "/proc/self/fd/9", "/workspace", "fifo", "sparse"]
)
async def test_read_special_files(arena: Arena, path: str) -> None:
    r = await arena.step("mkfifo fifo && truncate -s 10G sparse")
    assert r.exit_code == 0, r.output
    read = await arena.read(path)
    assert not read.ok and read.message, read.message
    assert len(read.content) == 0
    await arena.assert_contained()


@pytest.mark.parametrize(
    "field", ["old", "new", "both", "write_content"], ids=["old", "new", "both", "write"]
)
async def test_ten_megabyte_strings(arena: Arena, field: str) -> None:
    big = "x" * (10 * 1024 * 1024)
    assert (await arena.write("small.txt", b"hello world\n")).ok
    if field == "write_content":
        r = await arena.write("small.txt", big.encode())
    else:
        old = big if field in ("old", "both") else "hello"
        new = big if field in ("new", "both") else "bye"
        r = await arena.act(edit_file=env_pb2.EditFile(path="small.txt", old=old, new=new))
    assert not r.ok and r.message, r.message
    assert (await arena.read("small.txt")).content == b"hello world\n"
    await arena.assert_contained()


async def test_edit_file_through_non_utf8_and_empty_old(arena: Arena) -> None:
    assert (await arena.write("bin", b"\xff\xfe\x00garbage")).ok
    r = await arena.act(edit_file=env_pb2.EditFile(path="bin", old="garbage", new="x"))
    assert not r.ok and "UTF-8" in r.message
    r = await arena.act(edit_file=env_pb2.EditFile(path="bin", old="", new="x"))
    assert not r.ok and "empty" in r.message
    await arena.assert_contained()


@pytest.mark.parametrize(
    "path", ["../escape", "/etc/evil", "a/../../escape", "ok\x00../x"], ids=lambda p: repr(p)
)
async def test_create_environment_files_outside_workspace(arena: Arena, path: str) -> None:
    with pytest.raises(InvalidRequestError):
        await arena.service.create_environment(arena.request(owner="evil", files={path: b"pwned"}))
    assert not list(arena.service.config.root_dir.glob("**/escape"))
    assert not Path("/etc/evil").exists()
    await arena.assert_contained()
