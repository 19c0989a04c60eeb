"""The wire protocol of a sandbox's persistent bash: commands in, output and status out.

Each command goes in as one line on the shell's stdin::

    __mf_run $'<command, ANSI-C quoted>' </dev/null >&9 2>&9 9>&-;
    builtin printf '\\n__MF_DONE_<nonce>__ %d\\n' $? >&9

``__mf_run`` ``eval``s the command in the shell itself (so ``cd`` and ``export``
persist), with stdin from /dev/null (commands never read the control channel) and
stdout and stderr merged into the output pipe. fd 9 keeps a copy of that pipe so that
the sentinel line still arrives when a command redirects or closes its own stdout.
The host reads the pipe until the sentinel with that command's random nonce.

Quoting with ``$'...'`` (every byte outside printable ASCII, and ``'`` and ``\\``,
as ``\\xHH``) keeps each command on one line without starting any process, so an
``echo`` costs no fork at all.

Interrupting: the host SIGKILLs the workload, then sends ``SIGUSR1`` to the shell.
Its trap returns 137 from the running function and arms a ``DEBUG`` trap (inherited
through ``set -T``) that returns from every enclosing function before their next
command runs, so ``__mf_run`` unwinds completely, even out of a shell-builtin loop
inside nested user functions; back at the top level the DEBUG trap removes itself.
"""

from __future__ import annotations

import asyncio
import secrets

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

INIT_SCRIPT = r"""
exec 9>&1 2>&1
__mf_run() { eval "$1"; }
__mf_read() {
  local PATH=__SAFE_PATH__
  if [[ -d $1 ]]; then builtin echo "is a directory"; return 1; fi
  if [[ ! -e $1 ]]; then builtin echo "no such file"; return 1; fi
  if [[ ! -f $1 ]]; then builtin echo "not a regular file"; return 1; fi
  head -c "$2" -- "$1" | base64 -w0
  local s=("${PIPESTATUS[@]}"); (( s[0] == 0 && s[1] == 0 ))
}
__mf_write() {
  local PATH=__SAFE_PATH__
  if [[ $1 == */* ]]; then
    local d=${1%/*}
    if [[ -n $d && ! -d $d ]]; then mkdir -p -- "$d" || return 1; fi
  fi
  if [[ -d $1 ]]; then builtin echo "is a directory"; return 1; fi
  cat -- "$2" > "$1"
}
__mf_unwind='if [[ -n "${FUNCNAME[0]-}" ]]; then return 137; fi; set +T; trap - DEBUG'
trap 'if [[ -n "${FUNCNAME[0]-}" ]]; then set -T; trap "$__mf_unwind" DEBUG; return 137; fi' USR1
""".replace("__SAFE_PATH__", SAFE_PATH)
"""Sent once when the shell starts: helper functions and the interrupt trap."""

TRUNCATION_MARKER = "\n[... megaflow: output truncated, {omitted} bytes omitted ...]\n"

_QUOTED = [
    chr(b) if 0x20 <= b < 0x7F and b not in (0x27, 0x5C) else f"\\x{b:02x}" for b in range(256)
]


def ansi_c_quote(text: str) -> str:
    """``text`` as a bash ``$'...'`` word on a single line (``text`` has no NUL)."""
    return "$'" + "".join([_QUOTED[b] for b in text.encode()]) + "'"


def new_nonce() -> str:
    """A fresh random nonce for a sentinel line."""
    return secrets.token_hex(8)


def marker(nonce: str) -> bytes:
    """The bytes that open the sentinel line of ``nonce`` (the status follows)."""
    return f"\n__MF_DONE_{nonce}__ ".encode()


def command_line(shell_code: str, nonce: str) -> bytes:
    """One control line: run ``shell_code`` (already bash syntax), then the sentinel."""
    return (
        f"{shell_code} </dev/null >&9 2>&9 9>&-; "
        f"builtin printf '\\n__MF_DONE_%s__ %d\\n' {nonce} $? >&9\n"
    ).encode()


def user_command_line(command: str, nonce: str) -> bytes:
    """The control line that ``eval``s a user command in the persistent shell."""
    return command_line(f"__mf_run {ansi_c_quote(command)}", nonce)


def ready_line(nonce: str) -> bytes:
    """Init script plus a sentinel: the shell's answer proves it is up."""
    return INIT_SCRIPT.encode() + command_line(":", nonce)


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
