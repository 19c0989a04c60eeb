"""Where workspace snapshots live: a directory, or any fsspec URL (memory://, s3://, ...).

Snapshot and restore URIs must lie under the store's base, so a request cannot make
the service read or write arbitrary places on its host. Content-addressed blobs
(`megaflow.env.blobs`) share the base under ``blobs/``; a snapshot may not be written
there.
"""

from __future__ import annotations

import asyncio
import errno
import posixpath
from pathlib import Path

import fsspec  # type: ignore[import-untyped]

from megaflow.core.errors import InvalidRequestError, NotFoundError

MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024 * 1024
IO_TIMEOUT_S = 300.0


class ArtifactStore:
    """Reads and writes snapshot archives under one base URL."""

    def __init__(self, base: str | Path) -> None:
        if isinstance(base, Path) or "://" not in base:
            base = f"file://{Path(base).resolve()}"
        self.base = base.rstrip("/")
        self._protocol = self.base.split("://", 1)[0]

    def uri_for(self, name: str) -> str:
        return f"{self.base}/{name}"

    def check(self, uri: str) -> str:
        """``uri`` normalised, or InvalidRequestError if it lies outside the store."""
        if "\x00" in uri:  # the OS refuses it (ValueError): a bad request, not a bug
            raise InvalidRequestError(f"snapshot URI {uri!r} holds a NUL byte")
        if "://" not in uri:
            uri = f"file://{uri}" if uri.startswith("/") else f"{self.base}/{uri}"
        protocol, path = uri.split("://", 1)
        norm = f"{protocol}://{posixpath.normpath('/' + path).lstrip('/')}"
        if protocol == "file":
            norm = f"file://{posixpath.normpath(path)}"
        if not norm.startswith(self.base + "/"):
            raise InvalidRequestError(f"snapshot URI {uri!r} is outside the store {self.base}")
        return norm

    async def write(self, uri: str, data: bytes) -> str:
        uri = self.check(uri)
        if uri.startswith(f"{self.base}/blobs/"):
            raise InvalidRequestError(f"snapshot URI {uri!r} is in the store's blobs/ folder")
        if self._protocol == "file":
            await asyncio.to_thread(
                Path(uri.removeprefix("file://")).parent.mkdir, parents=True, exist_ok=True
            )
        async with asyncio.timeout(IO_TIMEOUT_S):
            await asyncio.to_thread(_write, uri, data)
        return uri

    async def read(self, uri: str) -> bytes:
        uri = self.check(uri)
        try:
            async with asyncio.timeout(IO_TIMEOUT_S):
                return await asyncio.to_thread(_read, uri)
        except FileNotFoundError:
            raise NotFoundError(f"no snapshot at {uri}") from None
        except (IsADirectoryError, NotADirectoryError) as error:
            raise InvalidRequestError(f"no snapshot at {uri}: {error.strerror}") from None
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:  # a bad request, not a bug
                raise InvalidRequestError(f"snapshot URI too long: {uri[:100]}...") from None
            raise


def _write(uri: str, data: bytes) -> None:
    with fsspec.open(uri, "wb") as f:
        f.write(data)


def _read(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        data = f.read(MAX_SNAPSHOT_BYTES + 1)
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise InvalidRequestError(f"snapshot {uri} is larger than {MAX_SNAPSHOT_BYTES} bytes")
    return bytes(data)
