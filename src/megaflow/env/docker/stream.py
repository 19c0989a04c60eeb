"""An attached ``docker exec`` session on the event loop: stdin in, stdout+stderr out.

``docker`` (PyPI) is synchronous; its hijacked sockets would need a thread per
sandbox. Instead the exec is *started* here: one HTTP request on the daemon's unix
socket asking for a connection upgrade, after which the socket carries the process's
stdin one way and Docker's multiplexed stdout/stderr frames (8-byte header: stream,
0, 0, 0, big-endian length) the other. Frames are unpacked into an
:class:`asyncio.StreamReader`, so the shared :class:`~megaflow.env.shell.ShellReader` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from megaflow.core.errors import SandboxError
from megaflow.env.shell import ShellReader

_READ_LIMIT = 1 << 20
_MAX_HEADER_BYTES = 64 * 1024


class _MuxProtocol(asyncio.Protocol):
    """HTTP response head first, then Docker stream frames into ``stream``."""

    def __init__(self, stream: asyncio.StreamReader, head: asyncio.Future[bytes]) -> None:
        self._stream = stream
        self._head = head
        self._buf = bytearray()
        self._in_frames = False
        self.eof = False
        """Set as soon as the daemon closes its side (the process is gone)."""

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._in_frames:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEADER_BYTES and not self._head.done():
                    self._head.set_exception(SandboxError("docker: oversized response head"))
                return
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            self._in_frames = True
            if not self._head.done():
                self._head.set_result(head)
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 8:
            size = int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if len(buf) - pos - 8 < size:
                break
            if buf[pos] in (1, 2):  # stdout, stderr (0 = stdin echo, 3 = systemerr)
                self._stream.feed_data(bytes(buf[pos + 8 : pos + 8 + size]))
            pos += 8 + size
        if pos:
            del buf[:pos]

    def eof_received(self) -> bool | None:
        self.eof = True
        self._stream.feed_eof()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if not self._head.done():
            self._head.set_exception(SandboxError(f"docker closed the exec connection: {exc}"))
        self._stream.feed_eof()


class ExecStream:
    """A started, attached exec: :meth:`write` to its stdin, read via :attr:`reader`."""

    def __init__(
        self, transport: asyncio.Transport, protocol: _MuxProtocol, reader: ShellReader
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self.reader = reader

    @classmethod
    async def start(
        cls, socket_path: str, api_version: str, exec_id: str, timeout_s: float
    ) -> ExecStream:
        """Start exec ``exec_id`` attached; SandboxError if Docker refuses."""
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        head: asyncio.Future[bytes] = loop.create_future()
        body = json.dumps({"Detach": False, "Tty": False}).encode()
        request = (
            f"POST /v{api_version}/exec/{exec_id}/start HTTP/1.1\r\n"
            "Host: docker\r\nContent-Type: application/json\r\n"
            "Connection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        transport: asyncio.Transport | None = None
        protocol = _MuxProtocol(stream, head)
        try:
            async with asyncio.timeout(timeout_s):
                transport, _ = await loop.create_unix_connection(lambda: protocol, socket_path)
                transport.write(request)
                raw_head = await head
        except TimeoutError as exc:
            if transport is not None:
                transport.close()
            raise SandboxError(f"docker exec start timed out after {timeout_s} s") from exc
        except OSError as exc:
            raise SandboxError(f"cannot reach the docker daemon at {socket_path}: {exc}") from exc
        except BaseException:
            if transport is not None:
                transport.close()
            raise
        status_line = raw_head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] not in ("101", "200"):
            transport.close()
            raise SandboxError(f"docker exec start failed: {status_line}")
        return cls(transport, protocol, ShellReader(stream))

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the process's stdin (dropped once closed)."""
        if not self._transport.is_closing():
            self._transport.write(data)

    @property
    def closed(self) -> bool:
        """Whether the process is known to be gone (or the connection was closed)."""
        return self._transport.is_closing() or self._protocol.eof or self.reader.eof

    def close(self) -> None:
        """Close the connection (the process sees EOF on stdin)."""
        with contextlib.suppress(Exception):
            self._transport.close()
