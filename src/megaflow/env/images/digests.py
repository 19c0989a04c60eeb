"""Content digests of images, layers and manifests: ``sha256:<hex>`` strings, as OCI
and the registry API write them (one helper for bytes, one for files)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path


def bytes_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path, *, uncompressed: bool = False) -> str:
    """``sha256:<hex>`` of a file's bytes, or with ``uncompressed`` of its content once
    un-gzipped (a layer's diff_id; a file that is not gzip is taken as it is)."""
    with path.open("rb") as raw:
        if uncompressed and raw.read(2) == b"\x1f\x8b":
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw) as content:
                return "sha256:" + hashlib.file_digest(content, "sha256").hexdigest()
        raw.seek(0)
        return "sha256:" + hashlib.file_digest(raw, "sha256").hexdigest()
