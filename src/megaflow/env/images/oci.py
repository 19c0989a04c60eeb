"""Read images exported to disk: an OCI image layout, or a ``docker save`` archive.

``oci:/path`` names either a folder or a tar archive of one, in either format:

- OCI image layout (``index.json`` + ``blobs/sha256/...``; what ``skopeo copy
  oci:...`` and Docker >= 25 ``docker save`` write): the linux/amd64 manifest (or the
  only one, where it names no platform: `pick_platform`, which registry pulls use
  too) is used; the manifest and every layer are checked against their sha256 digests; the
  cache key is the manifest digest.
- Legacy ``docker save`` (``manifest.json`` with ``Config`` and ``Layers``): layers are
  checked against the config's ``rootfs.diff_ids``; the cache key is the config digest
  (the image id).

Blocking functions; errors name the image (``ImageNotFoundError`` when the path holds
no image or none for linux/amd64, SandboxError when a blob is missing or does not match
its digest).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.images.digests import bytes_digest, file_digest

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
PLATFORM = ("linux", "amd64")
"""(os, architecture) of the images the sandboxes run."""


class ImageNotFoundError(InvalidRequestError):
    """The image does not exist (repository, tag, digest, file, or a linux/amd64 entry
    of its index): the task fails at once, naming it; a retry would not help."""


def pick_platform(entries: list[Any], image: str) -> dict[str, Any]:
    """The entry of an image index (manifest list) that sandboxes can run: the one for
    `PLATFORM`; else a lone entry that names no platform (an index written for one
    image, as ``docker save`` does). ImageNotFoundError otherwise, naming what it has."""
    usable = [e for e in entries if isinstance(e, dict) and "digest" in e]
    if not usable:
        raise ImageNotFoundError(f"image {image}: the index lists no manifest")
    platforms = [e.get("platform") or {} for e in usable]
    for entry, platform in zip(usable, platforms, strict=True):
        if (platform.get("os"), platform.get("architecture")) == PLATFORM:
            return entry
    if len(usable) == 1 and not platforms[0]:
        return usable[0]
    found = ", ".join(f"{p.get('os')}/{p.get('architecture')}" for p in platforms)
    raise ImageNotFoundError(
        f"image {image}: no {'/'.join(PLATFORM)} manifest in its index ({found})"
    )


@dataclass(frozen=True)
class LocalImage:
    digest: str
    """Cache key: the OCI manifest digest, or the legacy config digest."""
    layers: tuple[tuple[Path, str | None], ...]
    """Each layer file, lowest first, with the sha256 its content must have (None: the
    uncompressed content is checked instead, against ``diff_ids``)."""
    diff_ids: tuple[str, ...] = ()


def unpack_archive(archive: Path, dest: Path, ref: str) -> Path:
    """Extract an archived layout into ``dest`` (tarfile's "data" filter) and return it."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageNotFoundError(f"image {ref}: cannot read archive {archive}: {exc}") from exc
    return dest


def _inside(root: Path, rel: str, ref: str) -> Path:
    path = Path(os.path.realpath(root / rel))
    if not path.is_relative_to(os.path.realpath(root)):
        raise SandboxError(f"image {ref}: {rel!r} points outside the image folder")
    return path


def _blob(root: Path, digest: str, ref: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64:
        raise SandboxError(f"image {ref}: unsupported digest {digest!r}")
    path = _inside(root, f"blobs/sha256/{hexdigest}", ref)
    if not path.is_file():
        raise SandboxError(f"image {ref}: blob {digest} is missing")
    return path


def _json(path: Path, ref: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SandboxError(f"image {ref}: unreadable {path.name}: {exc}") from exc


def read_layout(root: Path, ref: str) -> LocalImage:
    """Find the image in a layout folder (without reading its layers)."""
    if (root / "index.json").is_file():
        descriptor = pick_platform(_json(root / "index.json", ref).get("manifests", []), ref)
        for _ in range(2):  # an index may point at a nested index
            digest = str(descriptor["digest"])
            blob = _blob(root, digest, ref)
            data = blob.read_bytes()
            if bytes_digest(data) != digest:
                raise SandboxError(f"image {ref}: manifest digest mismatch ({digest})")
            manifest = json.loads(data)
            if descriptor.get("mediaType") not in INDEX_TYPES and "manifests" not in manifest:
                break
            descriptor = pick_platform(manifest.get("manifests", []), ref)
        layers: tuple[tuple[Path, str | None], ...] = tuple(
            (_blob(root, str(d["digest"]), ref), str(d["digest"])) for d in manifest["layers"]
        )
        return LocalImage(digest, layers)
    if (root / "manifest.json").is_file():
        entries = _json(root / "manifest.json", ref)
        if not isinstance(entries, list) or not entries:
            raise ImageNotFoundError(f"image {ref}: manifest.json lists no image")
        config_path = _inside(root, str(entries[0]["Config"]), ref)
        config = _json(config_path, ref)
        diff_ids = tuple(str(d) for d in config.get("rootfs", {}).get("diff_ids", []))
        legacy: tuple[tuple[Path, str | None], ...] = tuple(
            (_inside(root, str(x), ref), None) for x in entries[0]["Layers"]
        )
        if diff_ids and len(diff_ids) != len(legacy):
            raise SandboxError(f"image {ref}: {len(legacy)} layers but {len(diff_ids)} diff_ids")
        return LocalImage(file_digest(config_path), legacy, diff_ids)
    raise ImageNotFoundError(f"image {ref}: no index.json or manifest.json in {root}")


def verify_layers(image: LocalImage, ref: str) -> None:
    """Check every layer file against its digest (or its uncompressed diff_id)."""
    for i, (path, digest) in enumerate(image.layers):
        if not path.is_file():
            raise SandboxError(f"image {ref}: layer {path.name} is missing")
        if digest is not None:
            got = file_digest(path)
            want = digest
        elif image.diff_ids:
            got, want = file_digest(path, uncompressed=True), image.diff_ids[i]
        else:
            continue
        if got != want:
            raise SandboxError(f"image {ref}: layer digest mismatch: got {got}, want {want}")
