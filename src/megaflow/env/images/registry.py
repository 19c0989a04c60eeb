"""Pull images over the OCI / Docker Registry HTTP API v2 with aiohttp (no dockerd).

``resolve`` fetches the manifest (following an index / manifest list to linux/amd64),
``fetch_blob`` streams a blob to a file while hashing it and refuses a digest
mismatch. Anonymous access only; every request runs under the session's timeouts.
Errors name the image: :class:`ImageNotFoundError` (an InvalidRequestError: a retry
will not help) for an unknown repository, tag or blob; SandboxError (retryable) when
the registry cannot be reached, answers an error, or sends corrupt data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.images.digests import bytes_digest

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_REF = re.compile(
    r"(?P<host>[A-Za-z0-9.-]+(?::\d+)?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


class ImageNotFoundError(SandboxError):
    """The image (repository, tag, digest or one of its blobs) does not exist.

    An infrastructure failure, not the task's: the task is retried (the image may yet
    be pushed) and, if it never appears, fails with no reward and this message."""


@dataclass(frozen=True)
class RegistryRef:
    """``host[:port]/repository[:tag][@sha256:...]``."""

    host: str
    repository: str
    reference: str  # tag or digest
    text: str

    @classmethod
    def parse(cls, text: str) -> RegistryRef:
        match = _REF.fullmatch(text)
        if match is None:
            raise InvalidRequestError(f"invalid registry image reference {text!r}")
        reference = match["digest"] or match["tag"] or "latest"
        return cls(match["host"], match["repo"], reference, text)


@dataclass(frozen=True)
class Manifest:
    digest: str
    """sha256 of the manifest bytes: the image's cache key."""
    layers: tuple[tuple[str, int], ...]
    """(digest, size) of each layer, lowest first."""


class RegistryClient:
    """Talks to registries over plain HTTP (``scheme="http"``) or HTTPS."""

    def __init__(self, session: aiohttp.ClientSession, scheme: str = "http") -> None:
        self._session = session
        self._scheme = scheme

    def _url(self, ref: RegistryRef, kind: str, what: str) -> str:
        return f"{self._scheme}://{ref.host}/v2/{ref.repository}/{kind}/{what}"

    async def resolve(self, ref: RegistryRef, image: str) -> Manifest:
        """The image's manifest (an index is followed to its linux/amd64 entry)."""
        body, media_type = await self._manifest(ref, ref.reference, image)
        if media_type in INDEX_TYPES or "manifests" in body:
            chosen = pick_platform(body.get("manifests", []), image)
            body, _ = await self._manifest(ref, str(chosen["digest"]), image)
        raw, digest = body.pop("__raw__"), body.pop("__digest__")
        del raw
        layers = tuple((str(d["digest"]), int(d.get("size", 0))) for d in body.get("layers", []))
        if not layers or any(not d.startswith("sha256:") for d, _ in layers):
            raise SandboxError(f"image {image}: manifest has no usable sha256 layers")
        return Manifest(str(digest), layers)

    async def _manifest(
        self, ref: RegistryRef, reference: str, image: str
    ) -> tuple[dict[str, Any], str]:
        headers = {"Accept": ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))}
        url = self._url(ref, "manifests", reference)
        try:
            async with self._session.get(url, headers=headers) as response:
                if response.status == 404:
                    raise ImageNotFoundError(f"image {image} not found in registry {ref.host}")
                if response.status != 200:
                    text = (await response.text(errors="replace"))[:300]
                    raise SandboxError(
                        f"image {image}: registry answered {response.status}: {text}"
                    )
                raw = await response.content.read(MAX_MANIFEST_BYTES + 1)
                media_type = response.headers.get("Content-Type", "").split(";")[0]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SandboxError(f"image {image}: registry {ref.host} unreachable: {exc!r}") from exc
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SandboxError(f"image {image}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        digest = bytes_digest(raw)
        if reference.startswith("sha256:") and digest != reference:
            raise SandboxError(f"image {image}: manifest digest {digest} != {reference}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise SandboxError(f"image {image}: manifest is not JSON") from exc
        if not isinstance(body, dict):
            raise SandboxError(f"image {image}: manifest is not a JSON object")
        body["__raw__"], body["__digest__"] = raw, digest
        return body, media_type

    async def fetch_blob(self, ref: RegistryRef, digest: str, dest: Path, image: str) -> None:
        """Stream blob ``digest`` into ``dest``, checking its sha256 on the way."""
        hasher = hashlib.sha256()
        try:
            async with self._session.get(self._url(ref, "blobs", digest)) as response:
                if response.status == 404:
                    raise ImageNotFoundError(f"image {image}: blob {digest} not in registry")
                if response.status != 200:
                    raise SandboxError(f"image {image}: blob {digest}: HTTP {response.status}")
                with dest.open("wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        hasher.update(chunk)
                        out.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SandboxError(f"image {image}: registry {ref.host} unreachable: {exc!r}") from exc
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            raise SandboxError(f"image {image}: layer digest mismatch: got {got}, want {digest}")


PLATFORM = ("linux", "amd64")
"""(os, architecture) of the images the sandboxes run."""


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
