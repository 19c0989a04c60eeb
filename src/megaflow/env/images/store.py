"""``ImageStore``: image references -> rootfs folders for the local backend, on demand.

    store = ImageStore(ImageStoreConfig(cache_dir=Path("/var/cache/megaflow/images")))
    async with store.use("registry:127.0.0.1:5000/tools/busybox:v1") as rootfs:
        sandbox = LocalSandbox("sb-1", root_dir=..., image_root=rootfs)
    path = await store.rootfs("tar:/data/images/python.tar.gz")   # unpinned

Image references:

- ``dir:/abs/path``: a rootfs folder, used in place (not copied, not cached, never
  evicted);
- ``tar:/abs/path.tar[.gz|.xz]``: a rootfs tarball, cached by the sha256 of the file;
- ``oci:/abs/path``: an OCI image layout or ``docker save`` output, as a folder or an
  archive (see :mod:`megaflow.env.images.oci`), cached by manifest (or config) digest;
- ``docker://[HOST[:PORT]/]REPO[:TAG|@sha256:...]``: an image on a registry (Docker
  Hub when no host is named, as ``docker pull`` reads it), pulled by skopeo (see
  :mod:`megaflow.env.images.skopeo`: HTTPS with TLS verification unless the host is in
  ``insecure_registries``, credentials from the auth file) into an OCI layout, then
  extracted as ``oci:`` is; cached by the registry's manifest digest (of the
  linux/amd64 entry of an index), so a cached image costs one manifest request;
- ``registry:HOST[:PORT]/REPO[:TAG|@sha256:...]``: the same as ``docker://`` (the
  older spelling; the host is required).

Cache: ``cache_dir/images/<sha256 hex>/`` (``rootfs/`` and ``meta.json``) appears by an
atomic rename once complete, so a crash mid-pull leaves only ``cache_dir/tmp/`` debris,
removed when a store opens. Concurrent requests for one reference share one pull
(single flight); at most ``max_concurrent_pulls`` pulls run at once. After each pull
the least recently used images that are not in use (see :meth:`ImageStore.acquire`)
are evicted until the cache fits ``max_bytes`` (images in use are never evicted, so
the budget can be exceeded while they are). Failures name the image:
``ImageNotFoundError`` (an InvalidRequestError: final) when it does not exist,
``RegistryAccessError`` (final) when a registry refuses the credentials, its TLS or its
plain HTTP, SandboxError (retryable) when the source is unreachable or sends corrupt data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InvalidRequestError, MegaFlowError, SandboxError
from megaflow.env.images.digests import file_digest
from megaflow.env.images.extract import apply_layer, tree_size
from megaflow.env.images.oci import (
    ImageNotFoundError,
    LocalImage,
    read_layout,
    unpack_archive,
    verify_layers,
)
from megaflow.env.images.skopeo import PullOptions, RegistryRef, Skopeo

__all__ = ["Image", "ImageNotFoundError", "ImageStore", "ImageStoreConfig"]


class ImageStoreConfig(BaseModel):
    """Where and how images are cached."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_dir: Path = Field(description="Folder of the image cache (created if missing).")
    max_bytes: int = Field(
        default=20 * 1024**3, ge=0, description="Disk budget of cached images (LRU eviction)."
    )
    max_concurrent_pulls: int = Field(default=4, ge=1, description="Pulls running at once.")
    manifest_timeout_s: float = Field(
        default=60.0, gt=0, description="Budget of one registry manifest lookup."
    )
    pull_timeout_s: float = Field(
        default=1800.0, gt=0, description="Budget of one whole pull (all layers, extraction)."
    )
    insecure_registries: tuple[str, ...] = Field(
        default=(),
        description="Registries (HOST[:PORT] as references write them) allowed to answer "
        "over plain HTTP or with a certificate that does not verify; every other one is "
        "HTTPS with TLS verification (Docker's insecure-registries).",
    )
    registry_auth_file: Path | None = Field(
        default=None,
        description="Registry credentials (containers auth.json or Docker config.json); "
        "default: skopeo's search ($REGISTRY_AUTH_FILE, "
        "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json).",
    )
    registry_cert_dir: Path | None = Field(
        default=None,
        description="Folder of extra CA certificates (*.crt) trusted for registries, "
        "besides the system's and /etc/containers/certs.d/HOST:PORT/.",
    )


@dataclass(frozen=True)
class Image:
    """A provisioned image: hand ``rootfs`` to ``LocalSandbox(image_root=...)``."""

    ref: str
    digest: str
    """Content key: ``sha256:...`` of the manifest or tarball; ``dir:`` refs: the path."""
    rootfs: Path


@dataclass
class _Entry:
    digest: str
    path: Path  # cache_dir/images/<hex>
    size: int
    last_used: float
    users: int = 0


class ImageStore:
    """On-demand image provisioning with a content-addressed, size-bounded disk cache.

    Not thread-safe; use from one event loop. Call :meth:`close` when done (it cancels
    pulls in flight; cached images stay on disk for the next store).
    """

    def __init__(self, config: ImageStoreConfig) -> None:
        self.config = config
        self._images_dir = config.cache_dir / "images"
        self._tmp_dir = config.cache_dir / "tmp"
        self._entries: dict[str, _Entry] = {}
        self._by_ref: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[str]] = {}
        self._pull_slots = asyncio.Semaphore(config.max_concurrent_pulls)
        self._skopeo = Skopeo(
            PullOptions(
                insecure_registries=config.insecure_registries,
                auth_file=config.registry_auth_file,
                cert_dir=config.registry_cert_dir,
                inspect_timeout_s=config.manifest_timeout_s,
                copy_timeout_s=config.pull_timeout_s,
            )
        )
        self._opened = False
        self.pulls = 0
        """How many images were actually provisioned (pulled or extracted)."""
        self.hits = 0
        """How many requests were served from the cache."""
        self.active_pulls = 0
        """Pulls running now (at most ``max_concurrent_pulls``)."""
        self.peak_pulls = 0
        """The most pulls that ran at once."""

    # -- public API --------------------------------------------------------------------

    async def rootfs(self, ref: str) -> Path:
        """Provision ``ref`` if needed and return its rootfs (not pinned: may be evicted
        once no longer the newest image; use :meth:`acquire` / :meth:`use` to pin)."""
        image = await self._provision(ref)
        return image.rootfs

    async def acquire(self, ref: str) -> Image:
        """Provision ``ref`` and pin it against eviction until :meth:`release`."""
        image = await self._provision(ref, pin=True)
        return image

    def release(self, image: Image) -> None:
        """Unpin an image returned by :meth:`acquire` (once per acquire)."""
        entry = self._entries.get(image.digest)
        if entry is not None and entry.users > 0:
            entry.users -= 1
            entry.last_used = time.time()

    @contextlib.asynccontextmanager
    async def use(self, ref: str) -> AsyncIterator[Path]:
        """``async with store.use(ref) as rootfs``: pinned for the block's duration."""
        image = await self.acquire(ref)
        try:
            yield image.rootfs
        finally:
            self.release(image)

    def cached_bytes(self) -> int:
        """Disk space of the cached images (as measured after extraction)."""
        return sum(e.size for e in self._entries.values())

    def cached_digests(self) -> set[str]:
        return set(self._entries)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their skopeo runs are killed

    # -- provisioning --------------------------------------------------------------------

    async def _provision(self, ref: str, pin: bool = False) -> Image:
        if not isinstance(ref, str):
            raise InvalidRequestError("image reference must be a string")
        kind, _, rest = ref.partition(":")
        if kind == "dir":
            return self._dir_image(ref, rest)
        if kind == "docker" and rest.startswith("//"):
            rest = rest[2:]
        elif kind == "docker" or kind not in ("tar", "oci", "registry") or not rest:
            raise InvalidRequestError(
                f"image reference {ref!r} must start with dir:, tar:, oci:, docker:// or registry:"
            )
        if not self._opened:
            await asyncio.to_thread(self._open)
        digest = self._by_ref.get(ref)
        entry = self._entries.get(digest) if digest else None
        if entry is not None:
            self.hits += 1
        for _ in range(3):  # another pull may evict it before this waiter runs: pull again
            if entry is not None:
                break
            task = self._inflight.get(ref)
            if task is None:
                task = asyncio.create_task(self._pull(ref, kind, rest))
                self._inflight[ref] = task
                task.add_done_callback(lambda _t: self._inflight.pop(ref, None))
            entry = self._entries.get(await asyncio.shield(task))
        if entry is None:
            raise SandboxError(f"image {ref}: evicted again and again: the cache is too small")
        entry.last_used = time.time()
        if pin:
            entry.users += 1
        return Image(ref, entry.digest, entry.path / "rootfs")

    def _dir_image(self, ref: str, path: str) -> Image:
        root = Path(path)
        if not root.is_absolute() or not root.is_dir():
            raise ImageNotFoundError(f"image {ref}: {path!r} is not an absolute folder")
        return Image(ref, ref, root)

    async def _pull(self, ref: str, kind: str, rest: str) -> str:
        try:
            async with self._pull_slots, asyncio.timeout(self.config.pull_timeout_s):
                self.active_pulls += 1
                self.peak_pulls = max(self.peak_pulls, self.active_pulls)
                try:
                    digest = await self._pull_one(ref, kind, rest)
                finally:
                    self.active_pulls -= 1
        except TimeoutError as exc:
            raise SandboxError(
                f"image {ref}: pull did not finish within {self.config.pull_timeout_s} s"
            ) from exc
        self._by_ref[ref] = digest
        doomed = self._evict(keep=digest)
        if doomed:
            await asyncio.to_thread(_remove_all, doomed)
        return digest

    async def _pull_one(self, ref: str, kind: str, rest: str) -> str:
        if kind == "tar":
            return await self._from_tarball(ref, Path(rest))
        if kind == "oci":
            return await self._from_export(ref, Path(rest))
        rref = RegistryRef.parse(rest, ref)
        if kind == "registry" and not rest.startswith(f"{rref.host}/"):
            raise InvalidRequestError(f"image {ref}: registry: references name their host")
        return await self._from_registry(ref, rref)

    async def _from_tarball(self, ref: str, path: Path) -> str:
        if not path.is_absolute():
            raise InvalidRequestError(f"image {ref}: the tarball path must be absolute")
        try:
            digest = await asyncio.to_thread(file_digest, path)
        except OSError as exc:
            raise ImageNotFoundError(f"image {ref}: cannot read {str(path)!r}: {exc}") from exc
        if digest not in self._entries:
            await self._install(digest, ref, [path], None)
        return digest

    async def _from_export(self, ref: str, path: Path) -> str:
        if not path.is_absolute():
            raise InvalidRequestError(f"image {ref}: the path must be absolute")
        work = self._tmp_dir / f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            image = await asyncio.to_thread(_inspect_export, ref, path, work)
            if image.digest not in self._entries:
                await asyncio.to_thread(verify_layers, image, ref)
                await self._install(image.digest, ref, [p for p, _ in image.layers], work)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return image.digest

    async def _from_registry(self, ref: str, rref: RegistryRef) -> str:
        digest = await self._skopeo.resolve(rref, ref)
        if digest in self._entries:
            return digest
        work = self._tmp_dir / f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            await asyncio.to_thread(work.mkdir, parents=True)
            await self._skopeo.copy(rref, digest, work / "layout", ref)
            # No verify_layers here: skopeo checked every blob against its digest as it
            # copied (a mismatch is its error, classified as one).
            image = await asyncio.to_thread(read_layout, work / "layout", ref)
            # Keyed by the registry's digest: skopeo may rewrite a Docker manifest as OCI.
            await self._install(digest, ref, [p for p, _ in image.layers], work)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return digest

    # -- disk (blocking; run in threads) -------------------------------------------------

    def _open(self) -> None:
        """Index the cache on disk and remove what dead pulls left in ``tmp/``."""
        if self._opened:
            return
        self._images_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for debris in self._tmp_dir.iterdir():
            pid = debris.name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(debris, ignore_errors=True)
        for folder in self._images_dir.iterdir():
            try:
                meta = json.loads((folder / "meta.json").read_text())
                digest = str(meta["digest"])
                entry = _Entry(digest, folder, int(meta["size"]), folder.stat().st_mtime)
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._entries[digest] = entry
        self._opened = True

    async def _install(self, digest: str, ref: str, layers: list[Path], work: Path | None) -> None:
        """Extract (in a thread) and record the new image."""
        final, size = await asyncio.to_thread(self._extract, digest, ref, layers, work)
        self._entries[digest] = _Entry(digest, final, size, time.time())
        self.pulls += 1

    def _extract(
        self, digest: str, ref: str, layers: list[Path], work: Path | None
    ) -> tuple[Path, int]:
        """Apply ``layers`` into a temporary folder, then rename it into the cache."""
        final = self._images_dir / digest.split(":", 1)[1]
        stage = (work or self._tmp_dir) / f"{os.getpid()}-{secrets.token_hex(6)}-image"
        try:
            (stage / "rootfs").mkdir(parents=True)
            for layer in layers:
                try:
                    apply_layer(stage / "rootfs", layer)
                except MegaFlowError as exc:
                    raise SandboxError(f"image {ref}: {exc}") from exc
                except OSError as exc:
                    raise SandboxError(f"image {ref}: cannot extract a layer: {exc}") from exc
            size = tree_size(stage)
            meta = {"digest": digest, "ref": ref, "size": size, "created": time.time()}
            (stage / "meta.json").write_text(json.dumps(meta))
            try:
                stage.rename(final)
            except OSError:
                if not final.is_dir():  # another process installed it meanwhile: fine
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return final, size

    def _evict(self, keep: str) -> list[Path]:
        """Unindex unused images, least recently used first, until the budget holds, and
        move them to ``tmp/``; return those folders, for removal in a thread."""
        budget = self.config.max_bytes
        idle = sorted(
            (e for e in self._entries.values() if e.users == 0 and e.digest != keep),
            key=lambda e: e.last_used,
        )
        doomed = []
        for entry in idle:
            if self.cached_bytes() <= budget:
                break
            del self._entries[entry.digest]
            for ref in [r for r, d in self._by_ref.items() if d == entry.digest]:
                del self._by_ref[ref]
            trash = self._tmp_dir / f"{os.getpid()}-{secrets.token_hex(6)}-evicted"
            with contextlib.suppress(OSError):
                entry.path.rename(trash)
                doomed.append(trash)
        return doomed


def _remove_all(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _inspect_export(ref: str, path: Path, work: Path) -> LocalImage:
    """Find the image of an ``oci:`` reference (an archive is unpacked into ``work``)."""
    work.mkdir(parents=True)
    if path.is_dir():
        root = path
    elif path.is_file():
        root = unpack_archive(path, work / "archive", ref)
    else:
        raise ImageNotFoundError(f"image {ref}: nothing at {str(path)!r}")
    try:
        return read_layout(root, ref)
    except MegaFlowError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SandboxError(f"image {ref}: malformed image metadata: {exc!r}") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
