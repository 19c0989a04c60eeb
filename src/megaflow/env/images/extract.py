"""Apply image layers (tar, plain or gzip, bzip2, xz or zstd) to a rootfs folder,
honouring whiteouts.

OCI/Docker layers are applied in order onto one folder: a ``.wh.NAME`` entry deletes
``NAME`` from the layers below, and ``.wh..wh..opq`` in a folder hides everything the
layers below put there. Extraction is host-side and hostile-layer safe: member paths
may not leave the rootfs (also not through a symlink already extracted), hard links
must point inside it, device files are skipped and setuid/setgid bits are cleared
(tarfile's ``"tar"`` filter plus checks). Symlinks keep their targets, absolute ones
included: they are resolved inside the sandbox, never by this code. Blocking.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import zstandard

from megaflow.core.errors import InvalidRequestError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _layer_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    if member.ischr() or member.isblk():
        return None
    checked = tarfile.tar_filter(member, dest)
    if checked.islnk():
        target = os.path.realpath(os.path.join(dest, checked.linkname))
        if not _inside(dest, target):
            raise tarfile.LinkOutsideDestinationError(checked, target)
    return checked


def _remove(dest: str, rel: str) -> None:
    """Delete ``rel`` under ``dest`` without following a symlink out of it."""
    path = os.path.join(dest, rel)
    parent = os.path.realpath(os.path.dirname(path))
    if not _inside(dest, parent):
        raise InvalidRequestError(f"whiteout {rel!r} points outside the rootfs")
    target = os.path.join(parent, os.path.basename(path))
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        os.unlink(target)


def _clear_dir(dest: str, rel: str, keep: set[str]) -> None:
    """Empty ``rel`` of what lower layers put there (entries in ``keep`` are this layer's)."""
    folder = os.path.realpath(os.path.join(dest, rel))
    if not _inside(dest, folder) or not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        child = os.path.normpath(os.path.join(rel, entry))
        if child not in keep:
            _remove(dest, child)


@contextlib.contextmanager
def open_layer(layer: Path) -> Iterator[tarfile.TarFile]:
    """A layer file as a tar archive: compression found by its magic bytes (tarfile's
    own, and zstd, which tarfile reads as a stream in Python 3.11)."""
    with layer.open("rb") as raw:
        if raw.read(4) != ZSTD_MAGIC:
            raw.seek(0)
            with tarfile.open(fileobj=raw, mode="r:*") as tar:
                yield tar
            return
        raw.seek(0)
        with (
            zstandard.ZstdDecompressor().stream_reader(raw) as plain,
            tarfile.open(fileobj=plain, mode="r|") as tar,
        ):
            yield tar


def apply_layer(rootfs: Path, layer: Path) -> None:
    """Extract one layer file (tar, compressed or not) onto ``rootfs``;
    InvalidRequestError if the layer is malformed or hostile."""
    dest = os.path.realpath(rootfs)
    seen: set[str] = set()
    try:
        with open_layer(layer) as tar:
            for member in tar:
                name = os.path.normpath(PurePosixPath(member.name.lstrip("/")).as_posix())
                base, parent = os.path.basename(name), os.path.dirname(name)
                if base == OPAQUE:
                    _clear_dir(dest, parent, seen)
                    continue
                if base.startswith(WHITEOUT):
                    _remove(dest, os.path.join(parent, base[len(WHITEOUT) :]))
                    continue
                if name in seen and member.isdir():
                    continue
                # A file replacing a folder of a lower layer (or the reverse) replaces it.
                existing = os.path.join(dest, name)
                if name not in seen and os.path.lexists(existing):
                    if not (member.isdir() and os.path.isdir(existing)):
                        _remove(dest, name)
                seen.add(name)
                tar.extract(member, dest, numeric_owner=True, filter=_layer_filter)
    except tarfile.FilterError as exc:
        raise InvalidRequestError(f"unsafe layer {layer.name}: {exc}") from exc
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
        raise InvalidRequestError(f"malformed layer {layer.name}: {exc}") from exc


def tree_size(root: Path) -> int:
    """Bytes a folder tree occupies on disk (blocks, links not followed)."""
    total = 0
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total
