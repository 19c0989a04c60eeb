"""Validation and encoding of paths, files and archives moved into a Docker sandbox."""

from __future__ import annotations

import base64
import io
import posixpath
import tarfile
from collections.abc import Mapping

from megaflow.core.errors import InvalidRequestError, SandboxError


def relative_member(name: str) -> str:
    """A repository path: relative, normalised, not escaping its root."""
    if not isinstance(name, str) or not name or "\0" in name or len(name) > 4096:
        raise InvalidRequestError(f"invalid file path {str(name)[:100]!r}")
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == "." or norm == ".." or norm.startswith("../"):
        raise InvalidRequestError(f"file path must stay inside the workdir: {name!r}")
    return norm


def tar_files(files: Mapping[str, bytes], max_bytes: int) -> bytes:
    """A tar archive of ``files`` (paths relative to the workdir; parents implied)."""
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            member = relative_member(name)
            if not isinstance(content, (bytes, bytearray, memoryview)):
                raise InvalidRequestError(f"content of {name!r} must be bytes")
            data = bytes(content)
            total += len(data)
            if total > max_bytes:
                raise InvalidRequestError(f"files larger than {max_bytes} bytes in all")
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def check_archive(archive: bytes, max_bytes: int) -> None:
    """A snapshot archive: a readable tar whose members stay inside the workdir."""
    if not isinstance(archive, (bytes, bytearray, memoryview)):
        raise InvalidRequestError("archive must be bytes")
    if len(archive) > max_bytes:
        raise InvalidRequestError(f"archive larger than {max_bytes} bytes")
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(archive)), mode="r:") as tar:
            for member in tar:
                if member.name not in (".", "./"):
                    relative_member(member.name)
                if member.isdev():
                    raise InvalidRequestError(f"archive holds a device file: {member.name!r}")
    except tarfile.TarError as exc:
        raise InvalidRequestError(f"archive is not a tar file: {exc}") from exc


def b64_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64_cap(max_bytes: int) -> int:
    """Output to keep for ``max_bytes`` of base64 with a newline every 76 characters."""
    encoded = 4 * (max_bytes // 3 + 2)
    return encoded + encoded // 76 + 4096


def b64_decode(raw: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(raw.translate(None, b" \r\n"), validate=True)
    except ValueError as exc:
        raise SandboxError(f"{what}: garbled transfer") from exc
