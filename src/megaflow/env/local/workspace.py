"""Host-side operations on a sandbox's workspace folder: upload, snapshot, restore.

All functions block (call them through ``asyncio.to_thread``) and never follow a
symlink that the sandbox may have planted: uploads walk the tree with ``O_NOFOLLOW``
directory descriptors, snapshots store symlinks as symlinks, and restores go through
tarfile's ``"data"`` filter (no absolute or ``..`` member paths, no member written
through a symlink, no hard link or relative symlink leaving the workspace, no device
files, no setuid bits). One deliberate exception: a symlink to an *absolute* target
is kept (virtualenvs are full of them); it is only ever resolved inside the sandbox,
against the sandbox's own root.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import IO

from megaflow.core.errors import InvalidRequestError

MAX_SNAPSHOT_BYTES = 1024 * 1024 * 1024
"""Largest snapshot archive (uncompressed tar) a sandbox produces or accepts."""


def check_relative(path: str) -> tuple[str, ...]:
    """Split a workspace-relative path; InvalidRequestError for absolute, ``..`` or NUL."""
    if not isinstance(path, str) or not path or "\0" in path or len(path) > 4096:
        raise InvalidRequestError(f"invalid workspace path {str(path)[:100]!r}")
    pure = PurePosixPath(path)
    parts = tuple(p for p in pure.parts if p != ".")
    if pure.is_absolute() or not parts or ".." in parts:
        raise InvalidRequestError(f"workspace path must be relative, without '..': {path!r}")
    return parts


def write_files(root: Path, files: Mapping[str, bytes], owner: int | None = None) -> None:
    """Write ``files`` (relative path -> content) under ``root``, creating folders.

    Every component is opened with ``O_NOFOLLOW``: a symlink anywhere on the way is an
    error, so nothing is written outside ``root``. ENOSPC (workspace quota) becomes an
    InvalidRequestError. ``owner``: the uid (and gid) given every file and folder made.
    """
    checked = [(check_relative(path), bytes(data)) for path, data in files.items()]
    for parts, data in checked:
        try:
            _write_one(root, parts, data, owner)
        except OSError as exc:
            where = "/".join(parts)
            if exc.errno == errno.ENOSPC:
                raise InvalidRequestError(f"put_files {where!r}: workspace is full") from exc
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise InvalidRequestError(f"put_files {where!r}: path crosses a symlink") from exc
            raise InvalidRequestError(f"put_files {where!r}: {exc.strerror}") from exc


def _write_one(root: Path, parts: tuple[str, ...], data: bytes, owner: int | None) -> None:
    nofollow_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, nofollow_dir)
    try:
        for part in parts[:-1]:
            made = True
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                made = False
            next_fd = os.open(part, nofollow_dir, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            if made and owner is not None:
                os.fchown(fd, owner, owner)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(parts[-1], flags, 0o644, dir_fd=fd)
        try:
            if owner is not None:
                os.fchown(out, owner, owner)
            view = memoryview(data)
            while view:
                view = view[os.write(out, view) :]
        finally:
            os.close(out)
    finally:
        os.close(fd)


TAR = "/usr/bin/tar"
_PACK_CHUNK = 1 << 20


def pack(root: Path, max_bytes: int = MAX_SNAPSHOT_BYTES) -> bytes:
    """A tar archive of everything under ``root`` (paths relative, symlinks as links).

    GNU tar writes it (``--sparse``: a sparse file costs the archive only its data, not
    its apparent size; read back by tarfile, which extracts it sparse again), streamed
    into a temporary file that may spill to disk, never more than ``max_bytes``: a
    bigger workspace fails the snapshot with InvalidRequestError as soon as the archive
    passes the cap, before it is read into memory.
    """
    names = sorted(os.listdir(root))
    with tempfile.TemporaryFile(prefix="megaflow-snapshot-") as out:
        if names:
            _tar_into(root, names, out, max_bytes)
        else:  # an empty archive, as tarfile writes it
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT):
                pass
        out.seek(0)
        return out.read()


def _tar_into(root: Path, names: list[str], out: IO[bytes], max_bytes: int) -> None:
    argv = [
        TAR, "--create", "--file=-", "--sparse", "--format=posix", "--numeric-owner",
        "--recursion", f"--directory={root}",
        "--null", "--verbatim-files-from", "--files-from=-",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(b"\0".join(os.fsencode(n) for n in names) + b"\0")
        proc.stdin.close()
        written = 0
        while chunk := proc.stdout.read(_PACK_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise InvalidRequestError(
                    f"workspace snapshot exceeds {max_bytes} bytes (sparse files count only "
                    "their data): remove large files from the workspace or snapshot less"
                )
            out.write(chunk)
        errors = proc.stderr.read(65536)
        if proc.wait() not in (0, 1):  # 1: a file changed while read (frozen: rare)
            raise OSError(f"tar failed: {errors.decode(errors='replace').strip()[-500:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _restore_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter, except that absolute symlink targets are kept."""
    if member.issym() and member.linkname.startswith("/"):
        checked = tarfile.data_filter(member.replace(linkname="."), dest)
        return checked.replace(linkname=member.linkname) if checked is not None else None
    return tarfile.data_filter(member, dest)


def _open_archive(archive: bytes) -> tarfile.TarFile:
    if len(archive) > MAX_SNAPSHOT_BYTES:
        raise InvalidRequestError(f"snapshot archive exceeds {MAX_SNAPSHOT_BYTES} bytes")
    try:
        return tarfile.open(fileobj=io.BytesIO(archive), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidRequestError(f"not a tar archive: {exc}") from exc


def check_archive(archive: bytes) -> None:
    """Refuse a hostile or malformed archive before anything is changed.

    Each member goes through the extraction filter against an empty destination (the
    workspace is cleared before extraction), and no member may lie beneath a symlink
    of the archive (extraction would write through it).
    """
    links: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="megaflow-check-") as empty:
        dest = os.path.realpath(empty)
        try:
            with _open_archive(archive) as tar:
                for member in tar:
                    _restore_filter(member, dest)
                    parts = PurePosixPath(member.name.lstrip("/")).parts
                    for i in range(1, len(parts)):
                        if "/".join(parts[:i]) in links:
                            raise InvalidRequestError(
                                f"unsafe snapshot archive: {member.name!r} lies beneath a symlink"
                            )
                    if member.issym():
                        links.add("/".join(parts))
        except tarfile.FilterError as exc:
            raise InvalidRequestError(f"unsafe snapshot archive: {exc}") from exc
        except (tarfile.TarError, EOFError) as exc:
            raise InvalidRequestError(f"malformed snapshot archive: {exc}") from exc


def clear(root: Path) -> None:
    """Remove everything inside ``root`` (not ``root`` itself, which may be a mount)."""
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def give_to(root: Path, owner: int) -> None:
    """Make ``owner`` (uid and gid) own everything under ``root`` (symlinks themselves)."""
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), owner, owner)


def unpack(root: Path, archive: bytes, owner: int | None = None) -> None:
    """Replace ``root``'s content with ``archive`` (checked first; then cleared, extracted;
    then, with ``owner``, owned by that uid and gid)."""
    check_archive(archive)
    clear(root)
    try:
        with _open_archive(archive) as tar:
            tar.extractall(root, filter=_restore_filter)
    except tarfile.FilterError as exc:
        raise InvalidRequestError(f"unsafe snapshot archive: {exc}") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InvalidRequestError("restore: the archive does not fit the workspace") from exc
        raise
    if owner is not None:
        give_to(root, owner)
