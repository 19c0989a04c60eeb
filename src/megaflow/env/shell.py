"""The persistent shell every sandbox backend speaks, in one place: sentinel lines, the
output cap, the reader, one exchange's outcome, and `ShellSandbox.execute`.

A backend starts a shell (bash under bubblewrap, ``sh`` in a container, ...), writes
control lines to it, each ending in a sentinel that carries a random nonce and the
status (``\n__MF_DONE_<nonce>__ <status>\n``), and reads the merged output up to
that sentinel (`ShellReader`, keeping at most a cap: `OutputCollector`). How the lines
are quoted (`megaflow.env.local.shell` for bash, `megaflow.env.docker.shell` for POSIX
sh) and how a running command is interrupted are the backend's; how a step's result
is made from an exchange is `ShellSandbox.execute`, the same for all.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from megaflow.core.errors import InvalidRequestError
from megaflow.env.sandbox import CommandResult

MAX_COMMAND_BYTES = 1024 * 1024
"""Largest command `ShellSandbox.execute` accepts (UTF-8 bytes)."""
SHELL_RESTARTED = "[megaflow: the shell exited; a new shell was started]"
"""Opens (shell died before the command) or ends (died under it) a step's output."""
TRUNCATION_MARKER = "\n[... megaflow: output truncated, {omitted} bytes omitted ...]\n"

LineBuilder = Callable[[str], bytes]
"""Builds the control line of one exchange from its nonce."""


def new_nonce() -> str:
    """A fresh random nonce for a sentinel line."""
    return secrets.token_hex(8)


def marker(nonce: str) -> bytes:
    """The bytes that open the sentinel line of ``nonce`` (the status follows)."""
    return f"\n__MF_DONE_{nonce}__ ".encode()


class OutputCollector:
    """Keeps at most ``cap`` bytes of a command's output: the head and the tail halves."""

    def __init__(self, cap: int) -> None:
        self._head_cap = cap // 2
        self._tail_cap = cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def add(self, data: bytes | bytearray) -> None:
        """Append output (everything beyond the caps is counted, then dropped)."""
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > 2 * self._tail_cap + 65536:
                del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def truncated(self) -> bool:
        """Whether some output was dropped."""
        return self.total > self._head_cap + self._tail_cap

    def text(self) -> str:
        """The kept output, decoded, with a marker where bytes were dropped."""
        if not self.truncated:
            return (bytes(self._head) + bytes(self._tail)).decode("utf-8", errors="replace")
        tail = bytes(self._tail[len(self._tail) - self._tail_cap :]) if self._tail_cap else b""
        omitted = self.total - len(self._head) - len(tail)
        return (
            self._head.decode("utf-8", errors="replace")
            + TRUNCATION_MARKER.format(omitted=omitted)
            + tail.decode("utf-8", errors="replace")
        )

    def raw(self) -> bytes:
        """The kept bytes (head then tail), without any marker."""
        return bytes(self._head) + bytes(self._tail)


class ShellReader:
    """Reads the shell's merged output up to sentinel lines.

    Cancellation-safe: the only await is the pipe read, and unconsumed bytes stay in
    ``self._pending``, so a read abandoned at a timeout can be resumed.
    """

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self._pending = bytearray()
        self.eof = False

    async def read_until(self, sentinel: bytes, sink: OutputCollector) -> int | None:
        """Feed output into ``sink`` until ``sentinel``; return the status, None at EOF."""
        pending = self._pending
        keep = len(sentinel) - 1
        while True:
            at = pending.find(sentinel)
            if at >= 0:
                end = pending.find(b"\n", at + len(sentinel))
                if end >= 0:
                    sink.add(pending[:at])
                    status = pending[at + len(sentinel) : end]
                    del pending[: end + 1]
                    try:
                        return int(status)
                    except ValueError:
                        return 1
            elif len(pending) > keep:
                sink.add(pending[: len(pending) - keep])
                del pending[: len(pending) - keep]
            if self.eof:
                sink.add(pending)
                pending.clear()
                return None
            chunk = await self._stream.read(1 << 16)
            if not chunk:
                self.eof = True
            pending += chunk


@dataclass
class Exchange:
    """Raw outcome of one line sent to the shell."""

    status: int | None  # None: the shell died
    sink: OutputCollector
    timed_out: bool
    duration_s: float
    note: str = ""
    exit_code: int | None = None  # the shell's exit status when it died


def check_timeout(timeout_s: float) -> None:
    if not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise InvalidRequestError(f"timeout_s must be a positive number, got {timeout_s!r}")


def sandbox_path(path: str, workdir: str) -> str:
    """Validate a sandbox path; relative paths are taken relative to ``workdir``."""
    if not isinstance(path, str) or not path:
        raise InvalidRequestError("path must be a non-empty string")
    if "\0" in path or len(path) > 4096:
        raise InvalidRequestError(f"invalid path {path[:100]!r}")
    return path if path.startswith("/") else f"{workdir}/{path}"


class ShellSandbox:
    """`execute` for a sandbox with one persistent shell (a mixin of each backend's
    sandbox). The backend provides the three steps below; calls are serialised by
    ``_lock``, and ``_output_bytes`` caps what a command's output keeps."""

    _lock: asyncio.Lock
    _output_bytes: int

    async def _ready_shell(self) -> str:
        """Check the sandbox is usable; resync or restart its shell; return a note (e.g.
        `SHELL_RESTARTED`) to open the next output with. SandboxError if it cannot."""
        raise NotImplementedError

    def _user_line(self, command: str, nonce: str) -> bytes:
        """The control line that runs ``command`` in the persistent shell."""
        raise NotImplementedError

    async def _exchange(self, line: LineBuilder, timeout_s: float, cap: int) -> Exchange:
        """Send one control line and collect its output until the sentinel (interrupting
        the command at ``timeout_s``; restarting a shell that died under it)."""
        raise NotImplementedError

    async def execute(self, command: str, timeout_s: float) -> CommandResult:
        """Run ``command`` in the persistent shell (cwd and environment persist)."""
        if not isinstance(command, str) or not command.strip():
            raise InvalidRequestError("command must be a non-empty string")
        if "\0" in command:
            raise InvalidRequestError("command must not contain NUL bytes")
        if len(command.encode("utf-8", errors="surrogatepass")) > MAX_COMMAND_BYTES:
            raise InvalidRequestError(f"command longer than {MAX_COMMAND_BYTES} bytes")
        check_timeout(timeout_s)
        async with self._lock:
            note = await self._ready_shell()
            ex = await self._exchange(
                lambda nonce: self._user_line(command, nonce), timeout_s, self._output_bytes
            )
        output = ex.sink.text()
        if note:
            output = f"{note}\n{output}"
        if ex.timed_out:
            output += f"\n[megaflow: command timed out after {timeout_s:g} s and was killed]\n"
        if ex.note:
            output += f"\n{ex.note}\n"
        if ex.timed_out:
            exit_code = 137
        elif ex.status is None:  # the shell itself exited (``exit 3``, killed for memory)
            exit_code = 137 if ex.exit_code is None else ex.exit_code
        else:
            exit_code = ex.status
        return CommandResult(output, exit_code, ex.timed_out, ex.sink.truncated, ex.duration_s)
