"""Registry pulls with skopeo against real local registries (Debian's docker-registry):
by tag and by digest, zstd layers, one fetch for many requests, plain HTTP only by
opt-in, HTTPS with a private CA and basic auth, bad references, unreachable registries
and timeouts (skopeo killed, nothing left running)."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.images import ImageNotFoundError, ImageStore, ImageStoreConfig
from megaflow.env.images.build import build_oci_image, write_oci_layout
from megaflow.env.images.skopeo import RegistryAccessError, RegistryRef, classify
from megaflow.testing.registry import LocalRegistry, push_image, skopeo_push

pytestmark = pytest.mark.integration


def layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path / "registry")
    await reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[list[ImageStore]]:
    """Stores a test makes (``stores.append``), closed at the end."""
    made: list[ImageStore] = []
    try:
        yield made
    finally:
        for store in made:
            await store.close()


def new_store(stores: list[ImageStore], cache: Path, **settings: Any) -> ImageStore:
    store = ImageStore(ImageStoreConfig(cache_dir=cache, **settings))
    stores.append(store)
    return store


def skopeo_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name() == "skopeo"]


def test_references_read_as_docker_reads_them() -> None:
    swe = "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert RegistryRef.parse(swe, swe).docker() == f"docker://docker.io/{swe}"
    assert RegistryRef.parse("python", "x").docker() == "docker://docker.io/library/python:latest"
    pinned = RegistryRef.parse("localhost:5000/a/b@sha256:" + "0" * 64, "x")
    assert (pinned.host, pinned.repository, pinned.reference) == (
        "localhost:5000",
        "a/b",
        "sha256:" + "0" * 64,
    )
    assert RegistryRef.parse("ghcr.io/o/r:v1.2", "x").host == "ghcr.io"


async def test_bad_references_are_refused_before_any_pull(
    stores: list[ImageStore], tmp_path: Path
) -> None:
    store = new_store(stores, tmp_path / "cache")
    for ref, says in [
        ("docker://", "not a registry reference"),
        ("docker:/host.io/repo", "must start with"),
        ("docker://host.io/Upper/Case", "not a registry reference"),
        ("docker://host.io/repo:bad tag", "not a registry reference"),
        ("docker://-rf/repo", "not a registry reference"),
        ("docker://host.io/repo@sha256:abc", "not a registry reference"),
        ("registry:busybox:1", "name their host"),
    ]:
        with pytest.raises(InvalidRequestError, match=says) as info:
            await store.rootfs(ref)
        assert not info.value.retryable, ref
    assert store.pulls == 0 and skopeo_children() == []


async def test_pull_by_tag_and_by_digest_is_one_pull(
    registry: LocalRegistry, stores: list[ImageStore], tmp_path: Path
) -> None:
    digest = await push_image(registry.address, "tools/img", "v1", [layer({"f": b"one"})])
    store = new_store(stores, tmp_path / "cache", insecure_registries=(registry.address,))
    by_tag = await store.rootfs(f"docker://{registry.address}/tools/img:v1")
    by_digest = await store.rootfs(f"docker://{registry.address}/tools/img@{digest}")
    assert by_tag == by_digest and (by_tag / "f").read_bytes() == b"one"
    # Keyed by the registry's digest (skopeo rewrote the Docker manifest as OCI).
    assert store.pulls == 1 and store.cached_digests() == {digest}
    with pytest.raises(ImageNotFoundError, match="tools/img@sha256:1111") as info:
        await store.rootfs(f"docker://{registry.address}/tools/img@sha256:{'1' * 64}")
    assert not info.value.retryable


async def test_zstd_layers(
    registry: LocalRegistry, stores: list[ImageStore], tmp_path: Path
) -> None:
    lower = layer({"keep": b"1", "gone": b"2"})
    upper = layer({".wh.gone": b"", "new": b"3" * 100_000})
    layout = write_oci_layout(tmp_path / "layout", build_oci_image([lower, upper], "oci"))
    await asyncio.to_thread(skopeo_push, layout, f"{registry.address}/z/img:1", compress="zstd")
    url = f"http://{registry.address}/v2/z/img/manifests/1"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=accept) as response:
        manifest = json.loads(await response.read())
    types = {d["mediaType"] for d in manifest["layers"]}
    assert types == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    store = new_store(stores, tmp_path / "cache", insecure_registries=(registry.address,))
    rootfs = await store.rootfs(f"docker://{registry.address}/z/img:1")
    assert sorted(p.name for p in rootfs.iterdir()) == ["keep", "new"]
    assert (rootfs / "new").read_bytes() == b"3" * 100_000


async def test_many_requests_fetch_once(
    registry: LocalRegistry, stores: list[ImageStore], tmp_path: Path
) -> None:
    await push_image(registry.address, "one/img", "v1", [layer({"f": b"x" * 500_000})])
    store = new_store(stores, tmp_path / "cache", insecure_registries=(registry.address,))
    ref = f"docker://{registry.address}/one/img:v1"
    paths = await asyncio.gather(*(store.rootfs(ref) for _ in range(30)))
    assert len(set(paths)) == 1
    assert (store.pulls, store.peak_pulls, store.active_pulls) == (1, 1, 0)
    assert list((tmp_path / "cache/tmp").iterdir()) == []


async def test_plain_http_only_by_opt_in(
    registry: LocalRegistry, stores: list[ImageStore], tmp_path: Path
) -> None:
    await push_image(registry.address, "plain/img", "v1", [layer({"f": b"x"})])
    store = new_store(stores, tmp_path / "cache")
    for ref in (
        f"docker://{registry.address}/plain/img:v1",
        f"registry:{registry.address}/plain/img:v1",
    ):
        with pytest.raises(RegistryAccessError, match="plain HTTP") as info:
            await store.rootfs(ref)
        assert not info.value.retryable and "insecure_registries" in str(info.value)
    assert store.pulls == 0
    allowed = new_store(stores, tmp_path / "cache2", insecure_registries=(registry.address,))
    assert (await allowed.rootfs(f"docker://{registry.address}/plain/img:v1") / "f").is_file()


async def test_https_with_a_private_ca_and_basic_auth(
    stores: list[ImageStore], tmp_path: Path
) -> None:
    secure = LocalRegistry(tmp_path / "secure", tls=True, users={"ann": "s3cret"})
    await secure.start()
    try:
        good = secure.write_auth_file(tmp_path / "good.json", "ann", "s3cret")
        bad = secure.write_auth_file(tmp_path / "bad.json", "ann", "wrong")
        empty = tmp_path / "empty.json"
        empty.write_text('{"auths": {}}')
        layout = write_oci_layout(tmp_path / "layout", build_oci_image([layer({"f": b"s"})], "oci"))
        dest = f"{secure.address}/private/img:v1"
        await asyncio.to_thread(
            skopeo_push, layout, dest, tls_verify=True, auth_file=good, cert_dir=secure.ca_dir
        )
        ref = f"docker://{dest}"
        cases: list[tuple[dict[str, Any], str]] = [
            ({"registry_auth_file": good}, "TLS with registry"),  # CA not trusted
            ({"registry_auth_file": empty, "registry_cert_dir": secure.ca_dir}, "refused access"),
            ({"registry_auth_file": bad, "registry_cert_dir": secure.ca_dir}, "refused access"),
        ]
        for i, (settings, says) in enumerate(cases):
            store = new_store(stores, tmp_path / f"cache{i}", **settings)
            with pytest.raises(RegistryAccessError, match=says) as info:
                await store.rootfs(ref)
            assert not info.value.retryable and store.pulls == 0
        trusted = new_store(
            stores, tmp_path / "ok", registry_auth_file=good, registry_cert_dir=secure.ca_dir
        )
        assert (await trusted.rootfs(ref) / "f").read_bytes() == b"s"
        # Listed as insecure: its certificate need not verify (credentials still needed).
        unverified = new_store(
            stores,
            tmp_path / "ok2",
            registry_auth_file=good,
            insecure_registries=(secure.address,),
        )
        assert (await unverified.rootfs(ref) / "f").read_bytes() == b"s"
    finally:
        secure.stop()


async def test_unreachable_is_retryable(stores: list[ImageStore], tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "gone")
    await registry.start()
    address = registry.address
    registry.stop()
    store = new_store(stores, tmp_path / "cache", insecure_registries=(address,))
    with pytest.raises(SandboxError, match="unreachable") as info:
        await store.rootfs(f"docker://{address}/a/b:1")
    assert info.value.retryable and "connection refused" in str(info.value)


async def test_a_silent_registry_times_out_and_skopeo_is_killed(
    stores: list[ImageStore], tmp_path: Path
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        store = new_store(
            stores, tmp_path / "cache", insecure_registries=(address,), manifest_timeout_s=1
        )
        started = time.monotonic()
        with pytest.raises(SandboxError) as info:
            await store.rootfs(f"docker://{address}/slow/img:1")
        assert info.value.retryable and time.monotonic() - started < 10
        assert skopeo_children() == []
        # A caller that gives up (cancel) stops skopeo too.
        patient = new_store(stores, tmp_path / "cache2", insecure_registries=(address,))
        pull = asyncio.create_task(patient.rootfs(f"docker://{address}/slow/img:2"))
        for _ in range(100):
            if skopeo_children():
                break
            await asyncio.sleep(0.05)
        assert skopeo_children()
        await patient.close()
        with pytest.raises(asyncio.CancelledError):
            await pull
        assert skopeo_children() == []
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_skopeo_messages_are_classified() -> None:
    ref = RegistryRef.parse("host.io/a/b:1", "img")
    fatal = 'time="t" level=fatal msg="{}"'
    cases = [
        (
            "reading manifest 1 in host.io/a/b: manifest unknown: manifest unknown",
            ImageNotFoundError,
        ),
        ("requested access to the resource is denied", RegistryAccessError),
        ("writing blob: open /cache/tmp/x: permission denied", SandboxError),
        ("pinging container registry host.io: dial tcp: connect: connection refused", SandboxError),
        ("x509: certificate signed by unknown authority", RegistryAccessError),
    ]
    for said, kind in cases:
        error = classify("img", ref, fatal.format(said))
        assert type(error) is kind, said
        assert str(error).endswith(said)  # skopeo's own words, without its log frame
