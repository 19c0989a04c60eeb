"""Content-addressed blobs: repositories and large files travel as "sha256:<hex>".

`BlobStore` keeps blobs under one fsspec base (a local directory by default, any fsspec
URL for a cluster: ``s3://bucket/prefix``, ``memory://x``), at ``<base>/blobs/sha256/<hex>``;
a blob, once there, never changes, so writers never coordinate (a second `put` of the
same content finds it and writes nothing). `BlobStore.pack_directory` turns a folder
into a reproducible tar archive blob: the way a repository becomes a
``WorkspaceSource.artifact``.

`BlobCache` is the per-host copy an Environment Service extracts from: a blob is
fetched once per host (concurrent requests for it share one download), its digest is
verified while it streams, and it appears under its digest only by an atomic rename,
so a crashed or concurrent fetch never leaves a corrupt entry. Past its byte budget
the least recently used blobs not in use are evicted.

Every call that blocks is a plain function here; async callers run them in a thread
with a timeout (`BlobCache.fetch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import fsspec  # type: ignore[import-untyped]

from megaflow.core.errors import InvalidRequestError
from megaflow.env.images.digests import bytes_digest, file_digest

DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
CHUNK_BYTES = 1024 * 1024
# Packed files all get this mtime (2020-01-01): the same tree packs to the same digest
# wherever it was checked out, and unlike 0 it is past 1980, which zip (wheels) needs.
PACK_MTIME = 1_577_836_800


def check_digest(digest: str) -> str:
    """The hex part of ``"sha256:<hex>"``; InvalidRequestError if it is not one."""
    match = DIGEST.fullmatch(digest)
    if match is None:
        raise InvalidRequestError(f"artifact {digest!r} is not a digest of the form sha256:<hex>")
    return match.group(1)


class BlobStore:
    """Content-addressed blobs under one fsspec base URL (blocking calls)."""

    def __init__(self, base: str | Path) -> None:
        if isinstance(base, Path) or "://" not in base:
            base = f"file://{Path(base).resolve()}"
        self.base = base.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.base)

    def path(self, digest: str) -> str:
        """Where the blob lives in the store's filesystem (a path, not a URL)."""
        return f"{self._root.rstrip('/')}/blobs/sha256/{check_digest(digest)}"

    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(self.path(digest)))

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; its digest."""
        digest = bytes_digest(data)
        if not self.exists(digest):
            self._publish(digest, lambda tmp: self.fs.pipe_file(tmp, data))
        return digest

    def put_file(self, path: Path) -> str:
        """Store a file's content (streamed); its digest."""
        digest = file_digest(path)
        if not self.exists(digest):
            self._publish(digest, lambda tmp: self.fs.put_file(str(path), tmp))
        return digest

    def pack_directory(self, root: Path) -> str:
        """Store the folder ``root`` as a tar archive of its content (relative paths,
        modes and symlinks kept; owners and mtimes normalised, entries sorted: the same
        tree gives the same digest); the archive's digest."""
        root = Path(root)
        if not root.is_dir():
            raise InvalidRequestError(f"{root} is not a directory")
        with tempfile.TemporaryDirectory(prefix="megaflow-pack-") as tmp:
            archive = Path(tmp) / "tree.tar"
            with open(archive, "wb") as f:
                write_tar(root, f)
            return self.put_file(archive)

    def size(self, digest: str) -> int:
        """The blob's size in bytes; InvalidRequestError if the store has no such blob."""
        try:
            return int(self.fs.size(self.path(digest)))
        except FileNotFoundError:
            raise InvalidRequestError(
                f"artifact {digest} is not in the store {self.base}"
            ) from None

    def open(self, digest: str) -> IO[bytes]:
        """The blob for reading; InvalidRequestError if the store has no such blob."""
        try:
            return self.fs.open(self.path(digest), "rb")  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise InvalidRequestError(
                f"artifact {digest} is not in the store {self.base}"
            ) from None

    def _publish(self, digest: str, write: Callable[[str], Any]) -> None:
        """Write under a temporary name, then rename: readers never see a partial blob."""
        final = self.path(digest)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        try:
            write(tmp)
            self.fs.mv(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)


def write_tar(root: Path, out: IO[bytes]) -> None:
    """A reproducible tar archive of ``root``'s content into ``out``."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = PACK_MTIME
        return info

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in [*dirnames, *sorted(filenames)]:
                path = base / name
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
                if info is None:  # a socket or other special file: not content
                    continue
                info = normalise(info)
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


class BlobCache:
    """This host's copies of store blobs, by digest, within a byte budget (LRU)."""

    def __init__(self, store: BlobStore, cache_dir: Path, max_bytes: int) -> None:
        self.store = store
        self.dir = Path(cache_dir) / "sha256"
        self.max_bytes = max_bytes
        self._fetching: dict[str, asyncio.Future[Path]] = {}
        self._pinned: dict[str, int] = {}
        self.fetches = 0  # downloads started by this object (tests and benchmarks read it)

    @contextlib.asynccontextmanager
    async def blob(self, digest: str, timeout_s: float) -> AsyncIterator[Path]:
        """The blob's local path, fetched if absent; not evicted while the block runs."""
        hexdigest = check_digest(digest)
        self._pinned[hexdigest] = self._pinned.get(hexdigest, 0) + 1
        try:
            yield await self.fetch(digest, timeout_s)
        finally:
            self._pinned[hexdigest] -= 1
            if not self._pinned[hexdigest]:
                del self._pinned[hexdigest]

    async def fetch(self, digest: str, timeout_s: float) -> Path:
        """The blob's local path; fetched (once, whoever else asks meanwhile) if absent.

        A fetch abandoned by its caller's timeout still completes in its thread (bounded
        by the blob's size), and the next caller finds it."""
        hexdigest = check_digest(digest)
        target = self.dir / hexdigest
        if target.exists():
            with contextlib.suppress(FileNotFoundError):
                os.utime(target)  # recently used
                return target
        pending = self._fetching.get(hexdigest)
        if pending is None:
            self.fetches += 1
            pending = asyncio.ensure_future(asyncio.to_thread(self._download, digest, target))
            self._fetching[hexdigest] = pending
            pending.add_done_callback(lambda f: self._fetched(hexdigest, f))
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(pending)

    def _fetched(self, hexdigest: str, done: asyncio.Future[Path]) -> None:
        self._fetching.pop(hexdigest, None)
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have timed out

    def _download(self, digest: str, target: Path) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        expected = check_digest(digest)
        size = self.store.size(digest)
        if size > self.max_bytes:
            raise InvalidRequestError(
                f"artifact {digest} is {size} bytes, more than this host's artifact cache "
                f"holds ({self.max_bytes})"
            )
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".fetch-")
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self.store.open(digest) as src:
                while chunk := src.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != expected:
                raise InvalidRequestError(
                    f"artifact {digest} in {self.store.base} is corrupt: its content hashes "
                    f"to sha256:{hasher.hexdigest()}"
                )
            os.chmod(tmp, stat.S_IRUSR)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._evict(keep=expected)
        return target

    def _evict(self, keep: str) -> None:
        """Remove the least recently used unpinned blobs until the cache fits its budget."""
        entries = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                info = entry.stat()
                entries.append((info.st_mtime, info.st_size, entry.name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= self.max_bytes:
                break
            if name == keep or name in self._pinned:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / name)
            total -= size
