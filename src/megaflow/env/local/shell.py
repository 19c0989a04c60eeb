"""The wire protocol of a local sandbox's persistent bash: commands in, output and status
out (the sentinels, output cap and reader are shared: `megaflow.env.shell`).

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

_QUOTED = [
    chr(b) if 0x20 <= b < 0x7F and b not in (0x27, 0x5C) else f"\\x{b:02x}" for b in range(256)
]


def ansi_c_quote(text: str) -> str:
    """``text`` as a bash ``$'...'`` word on a single line (``text`` has no NUL)."""
    return "$'" + "".join([_QUOTED[b] for b in text.encode()]) + "'"


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
