"""ImageStore against a real registry (Debian's docker-registry, pulled from with
skopeo), real tarballs, real sandboxes: on-demand pulls, single flight, digest checks,
whiteouts, eviction, errors. (Registry-specific cases: test_registry_pulls.py.)"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.images import ImageNotFoundError, ImageStore, ImageStoreConfig
from megaflow.env.images.build import (
    OciImage,
    build_busybox_rootfs,
    build_oci_image,
    tar_layer,
    write_oci_layout,
)
from megaflow.env.images.digests import bytes_digest
from megaflow.env.images.oci import INDEX_TYPES
from megaflow.env.local import LocalSandbox
from megaflow.testing.registry import LocalRegistry, push_image, push_rootfs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path / "registry")
    await reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def config(registry: LocalRegistry, cache: Path, **settings: int) -> ImageStoreConfig:
    """A store's settings, with the test registry (plain HTTP) allowed."""
    return ImageStoreConfig(cache_dir=cache, insecure_registries=(registry.address,), **settings)


@pytest.fixture
async def store(registry: LocalRegistry, tmp_path: Path) -> AsyncIterator[ImageStore]:
    s = ImageStore(config(registry, tmp_path / "cache"))
    try:
        yield s
    finally:
        await s.close()


def layer(files: dict[str, bytes | None]) -> bytes:
    """An uncompressed tar layer; ``None`` makes a folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_pull_from_registry_runs_a_sandbox(
    registry: LocalRegistry, store: ImageStore, busybox: Path, tmp_path: Path
) -> None:
    await push_rootfs(registry.address, "tools/busybox", "v1", busybox)
    ref = f"registry:{registry.address}/tools/busybox:v1"
    async with store.use(ref) as rootfs:
        assert store.pulls == 1
        assert (rootfs / "usr/bin/busybox").is_file() and (rootfs / "bin").is_symlink()
        sb = LocalSandbox("pulled", root_dir=tmp_path / "sb", image_root=rootfs)
        await sb.start()
        try:
            result = await sb.execute(
                "busybox | head -1; test -e /usr/bin/bwrap || echo hidden", 10
            )
            assert result.output.startswith("BusyBox v") and result.output.endswith("hidden\n")
        finally:
            await sb.stop()
    assert await store.rootfs(ref) == rootfs  # a cache hit: no second pull
    assert (store.pulls, store.hits) == (1, 1)


async def test_hundred_concurrent_requests_pull_once(
    registry: LocalRegistry, busybox: Path, tmp_path: Path
) -> None:
    digest = await push_rootfs(registry.address, "tools/busybox", "v1", busybox, flavour="oci")
    ref = f"registry:{registry.address}/tools/busybox:v1"
    store = ImageStore(config(registry, tmp_path / "cache", max_concurrent_pulls=1))
    try:
        paths = await asyncio.gather(*(store.rootfs(ref) for _ in range(100)))
        assert len(set(paths)) == 1 and store.pulls == 1
        assert store.cached_digests() == {digest}
    finally:
        await store.close()
    # A new store over the same cache finds the image on disk: nothing is extracted again.
    again = ImageStore(config(registry, tmp_path / "cache"))
    try:
        assert await again.rootfs(ref) == paths[0]
        assert again.pulls == 0
    finally:
        await again.close()
    assert os.listdir(tmp_path / "cache/tmp") == []


async def test_layers_apply_in_order_with_whiteouts(
    registry: LocalRegistry, store: ImageStore
) -> None:
    lower = layer(
        {"a": None, "a/keep": b"1", "a/gone": b"2", "d": None, "d/old": b"3", "f": b"file"}
    )
    upper = layer({"a/.wh.gone": b"", "d/.wh..wh..opq": b"", "d/new": b"4", "f": b"changed"})
    await push_image(registry.address, "layered", "v1", [lower, upper])
    rootfs = await store.rootfs(f"registry:{registry.address}/layered:v1")
    assert sorted(os.listdir(rootfs)) == ["a", "d", "f"]
    assert os.listdir(rootfs / "a") == ["keep"]
    assert os.listdir(rootfs / "d") == ["new"]
    assert (rootfs / "f").read_bytes() == b"changed"


async def test_eviction_spares_images_in_use(registry: LocalRegistry, tmp_path: Path) -> None:
    refs = []
    for name in ("one", "two", "three"):
        await push_image(registry.address, name, "v1", [layer({name: name.encode() * 1000})])
        refs.append(f"registry:{registry.address}/{name}:v1")
    store = ImageStore(config(registry, tmp_path / "cache", max_bytes=1))
    try:
        pinned = await store.acquire(refs[0])
        second = await store.rootfs(refs[1])  # over budget, but "one" is in use
        assert pinned.rootfs.is_dir() and second.is_dir()
        store.release(pinned)
        third = await store.rootfs(refs[2])  # now both older, unused images go
        assert third.is_dir()
        assert not pinned.rootfs.exists() and not second.exists()
        assert len(store.cached_digests()) == 1
        assert (await store.rootfs(refs[0])).is_dir()
        assert store.pulls == 4  # "one" had to be pulled again
    finally:
        await store.close()


async def test_unknown_image_names_it(registry: LocalRegistry, store: ImageStore) -> None:
    ref = f"registry:{registry.address}/no/such-image:v9"
    with pytest.raises(ImageNotFoundError, match="no/such-image:v9") as info:
        await asyncio.gather(*(store.rootfs(ref) for _ in range(5)))
    assert isinstance(info.value, InvalidRequestError) and not info.value.retryable  # final
    assert "manifest unknown" in str(info.value)  # skopeo's own words
    with pytest.raises(ImageNotFoundError, match=re.escape("nothing.tar")):
        await store.rootfs("tar:/nonexistent/nothing.tar")
    with pytest.raises(InvalidRequestError, match="must start with"):
        await store.rootfs("ubuntu:22.04")


async def test_registry_down_is_retryable(registry: LocalRegistry, store: ImageStore) -> None:
    ref = f"registry:{registry.address}/tools/busybox:v1"
    registry.stop()
    with pytest.raises(SandboxError, match="tools/busybox:v1") as info:
        await store.rootfs(ref)
    assert info.value.retryable and "unreachable" in str(info.value)


async def test_corrupted_blob_is_rejected(
    registry: LocalRegistry, store: ImageStore, busybox: Path, tmp_path: Path
) -> None:
    content = layer({"hello": b"world"})
    await push_image(registry.address, "corrupt", "v1", [content])
    blob = registry.blob_path(
        "sha256:" + hashlib.sha256(gzip.compress(content, 6, mtime=0)).hexdigest()
    )
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF
    blob.write_bytes(bytes(data))
    ref = f"registry:{registry.address}/corrupt:v1"
    with pytest.raises(SandboxError, match="digest mismatch") as info:
        await store.rootfs(ref)
    assert ref in str(info.value)
    assert store.cached_digests() == set() and store.pulls == 0
    assert os.listdir(tmp_path / "cache/images") == os.listdir(tmp_path / "cache/tmp") == []


async def test_tarball_and_directory_sources(
    store: ImageStore, busybox: Path, tmp_path: Path
) -> None:
    tarball = tmp_path / "busybox.tar.gz"
    tarball.write_bytes(gzip.compress(tar_layer(busybox)))
    path = await store.rootfs(f"tar:{tarball}")
    assert (path / "usr/bin/busybox").is_file() and os.readlink(path / "bin") == "usr/bin"
    assert await store.rootfs(f"tar:{tarball}") == path
    assert (store.pulls, store.hits) == (1, 1)
    assert await store.rootfs(f"dir:{busybox}") == busybox  # used in place
    with pytest.raises(ImageNotFoundError):
        await store.rootfs(f"dir:{tmp_path}/missing")


async def test_hostile_layers_are_refused(store: ImageStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    hostile = [
        layer({f"../../{victim.name}/evil": b"x"}),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # symlink out, then write through it
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, str(victim)
        tar.addfile(link)
        through = tarfile.TarInfo("escape/evil")
        through.size = 1
        tar.addfile(through, io.BytesIO(b"x"))
    hostile.append(buf.getvalue())
    for i, content in enumerate(hostile):
        tarball = tmp_path / f"hostile{i}.tar"
        tarball.write_bytes(content)
        with pytest.raises(SandboxError, match=re.escape(f"hostile{i}.tar")):
            await store.rootfs(f"tar:{tarball}")
    assert list(victim.iterdir()) == []
    assert store.cached_digests() == set()


async def test_debris_of_a_crashed_pull_is_removed(tmp_path: Path, busybox: Path) -> None:
    debris = tmp_path / "cache/tmp" / f"{2**22 + 4242}-dead-image"  # no such pid
    (debris / "rootfs").mkdir(parents=True)
    tarball = tmp_path / "b.tar"
    tarball.write_bytes(tar_layer(busybox))
    store = ImageStore(ImageStoreConfig(cache_dir=tmp_path / "cache"))
    try:
        await store.rootfs(f"tar:{tarball}")
    finally:
        await store.close()
    assert not debris.exists()


async def test_oci_layouts_and_docker_save_archives(
    store: ImageStore, busybox: Path, tmp_path: Path
) -> None:
    base = layer({"etc": None, "etc/os": b"base", "old": b"x"})
    top = layer({".wh.old": b"", "etc/os": b"top"})
    image = build_oci_image([base, top], flavour="oci")
    layout = write_oci_layout(tmp_path / "layout", image)
    rootfs = await store.rootfs(f"oci:{layout}")
    assert (rootfs / "etc/os").read_bytes() == b"top" and not (rootfs / "old").exists()
    assert store.cached_digests() == {image.digest}
    archived = tmp_path / "layout.tar"
    with tarfile.open(archived, "w") as tar:
        tar.add(layout, arcname=".")
    assert await store.rootfs(f"oci:{archived}") == rootfs  # same digest: no new pull
    assert store.pulls == 1
    # Legacy `docker save`: manifest.json, a config with diff_ids, uncompressed layers.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    content = tar_layer(busybox)
    (legacy / "layer.tar").write_bytes(content)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [bytes_digest(content)]}})
    (legacy / "config.json").write_text(config)
    (legacy / "manifest.json").write_text(
        json.dumps([{"Config": "config.json", "RepoTags": ["bb:1"], "Layers": ["layer.tar"]}])
    )
    saved = tmp_path / "saved.tar"
    with tarfile.open(saved, "w") as tar:
        tar.add(legacy, arcname=".")
    assert (await store.rootfs(f"oci:{saved}") / "usr/bin/busybox").is_file()
    # A blob that does not match its digest is refused, naming the image.
    blob = layout / "blobs/sha256" / bytes_digest(image.layers[1]).split(":")[1]
    blob.write_bytes(b"garbage")
    fresh = ImageStore(ImageStoreConfig(cache_dir=tmp_path / "cache2"))
    try:
        with pytest.raises(SandboxError, match="digest mismatch") as info:
            await fresh.rootfs(f"oci:{layout}")
        assert str(layout) in str(info.value)
        with pytest.raises(ImageNotFoundError):
            await fresh.rootfs(f"oci:{tmp_path}/nothing-here")
    finally:
        await fresh.close()


async def test_pull_cap_and_cancelled_waiters(registry: LocalRegistry, tmp_path: Path) -> None:
    refs = []
    for i in range(5):
        await push_image(registry.address, f"img{i}", "v1", [layer({"f": bytes([i]) * 300_000})])
        refs.append(f"registry:{registry.address}/img{i}:v1")
    store = ImageStore(config(registry, tmp_path / "cache", max_concurrent_pulls=2))
    try:
        paths = await asyncio.gather(*(store.rootfs(ref) for ref in refs))
        assert len(set(paths)) == 5 and store.pulls == 5
        assert 1 <= store.peak_pulls <= 2 and store.active_pulls == 0
        # A waiter that gives up does not cancel the pull the others wait for.
        await push_image(registry.address, "late", "v1", [layer({"g": b"late"})])
        ref = f"registry:{registry.address}/late:v1"
        impatient = asyncio.create_task(store.rootfs(ref))
        patient = asyncio.create_task(store.rootfs(ref))
        await asyncio.sleep(0)
        impatient.cancel()
        assert (await patient / "g").read_bytes() == b"late"
        assert impatient.cancelled() and store.pulls == 6
    finally:
        await store.close()


def _index(image: OciImage, *platforms: dict[str, str]) -> bytes:
    """An OCI index listing ``image`` once per platform (no platform: ``{}``)."""
    entries = [
        {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}
        | ({"platform": p} if p else {})
        for p in platforms
    ]
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPES[0], "manifests": entries}
    return json.dumps(index).encode()


ARM64 = {"os": "linux", "architecture": "arm64"}
AMD64 = {"os": "linux", "architecture": "amd64"}


@pytest.mark.parametrize(
    ("platforms", "runs"),
    [((ARM64,), False), ((ARM64, AMD64), True), (({},), True), (({}, {}), False)],
    ids=["arm64-only", "arm64+amd64", "one-unnamed", "two-unnamed"],
)
async def test_registry_and_oci_layout_pick_the_same_platform(
    registry: LocalRegistry,
    store: ImageStore,
    tmp_path: Path,
    platforms: tuple[dict[str, str], ...],
    runs: bool,
) -> None:
    content = layer({"etc": None, "etc/os": b"mine"})
    image = build_oci_image([content], flavour="oci")
    assert await push_image(registry.address, "multi/img", "plain", [content], flavour="oci") == (
        image.digest
    )
    index = _index(image, *platforms)
    url = f"http://{registry.address}/v2/multi/img/manifests/idx"
    async with aiohttp.ClientSession() as session:
        async with session.put(url, data=index, headers={"Content-Type": INDEX_TYPES[0]}) as r:
            assert r.status == 201, await r.text()
    layout = write_oci_layout(tmp_path / "layout", image)
    (layout / "index.json").write_bytes(index)
    sources = [f"registry:{registry.address}/multi/img:idx", f"oci:{layout}"]
    for source in sources:
        if runs:
            assert (await store.rootfs(source) / "etc/os").read_bytes() == b"mine"
        else:
            with pytest.raises(ImageNotFoundError, match="no linux/amd64 manifest") as info:
                await store.rootfs(source)
            assert ("linux/arm64" in str(info.value)) == (ARM64 in platforms)
