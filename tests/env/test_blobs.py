"""The content-addressed blob store and this host's cache of it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.artifacts import ArtifactStore
from megaflow.env.blobs import BlobCache, BlobStore


def _tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("pkg/a.py")


def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest = store.put_bytes(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert store.put_bytes(b"hello") == digest
    (tmp_path / "f").write_bytes(b"hello")
    assert store.put_file(tmp_path / "f") == digest
    with store.open(digest) as f:
        assert f.read() == b"hello"
    blobs = list((tmp_path / "store" / "blobs" / "sha256").iterdir())
    assert [p.name for p in blobs] == [digest.removeprefix("sha256:")]


def test_pack_directory_is_reproducible_and_keeps_modes_and_links(tmp_path: Path) -> None:
    store = BlobStore(f"memory://{tmp_path.name}")
    _tree(tmp_path / "one")
    _tree(tmp_path / "two")
    os.utime(tmp_path / "two" / "pkg" / "a.py", (1, 1))  # another checkout, another mtime
    digest = store.pack_directory(tmp_path / "one")
    assert store.pack_directory(tmp_path / "two") == digest
    with store.open(digest) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["link", "pkg", "pkg/a.py", "run.sh"]
    assert members["run.sh"].mode & 0o111
    assert members["link"].issym() and members["link"].linkname == "pkg/a.py"
    assert {m.uid for m in members.values()} == {0}


def test_bad_and_unknown_digests_are_clear_errors(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    with pytest.raises(InvalidRequestError, match="not a digest"):
        store.path("sha256:xyz")
    with pytest.raises(InvalidRequestError, match="not in the store"):
        store.open("sha256:" + "0" * 64)


async def test_cache_fetches_once_verifies_and_evicts_lru(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    cache = BlobCache(store, tmp_path / "cache", max_bytes=2500)
    digests = [store.put_bytes(bytes([i]) * 1000) for i in range(3)]
    paths = await asyncio.gather(*(cache.fetch(digests[0], 10) for _ in range(5)))
    assert cache.fetches == 1 and len(set(paths)) == 1
    assert paths[0].read_bytes() == bytes([0]) * 1000
    await cache.fetch(digests[1], 10)
    async with cache.blob(digests[0], 10):  # pinned, though least recently used
        os.utime(paths[0], (1, 1))
        await cache.fetch(digests[2], 10)
        assert paths[0].exists()
    assert not (cache.dir / digests[1].removeprefix("sha256:")).exists()
    assert cache.fetches == 3


async def test_a_corrupt_blob_is_refused_and_not_cached(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest = store.put_bytes(b"good")
    Path(store.path(digest)).write_bytes(b"evil")
    cache = BlobCache(store, tmp_path / "cache", max_bytes=1 << 20)
    with pytest.raises(InvalidRequestError, match="corrupt"):
        await cache.fetch(digest, 10)
    assert list(cache.dir.iterdir()) == []


async def test_a_blob_larger_than_the_cache_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    digest = store.put_bytes(b"x" * 2000)
    cache = BlobCache(store, tmp_path / "cache", max_bytes=1000)
    with pytest.raises(InvalidRequestError, match="more than this host's artifact cache"):
        await cache.fetch(digest, 10)


async def test_snapshots_cannot_overwrite_blobs(tmp_path: Path) -> None:
    snapshots = ArtifactStore(tmp_path / "store")
    with pytest.raises(InvalidRequestError, match="blobs"):
        await snapshots.write("blobs/sha256/" + "0" * 64, b"x")
