"""The wire protocol of a Docker sandbox's persistent shell: POSIX ``sh``, not bash.

Images differ (busybox ``ash``, Debian ``dash``, ``bash``), so everything here is
POSIX sh. Each command goes in on the shell's stdin as::

    __mf_run '<command, single-quoted>' </dev/null >&9 2>&9 9>&-;
    command printf '\\n__MF_DONE_<nonce>__ %d\\n' $? >&9

``__mf_run`` runs ``command eval "$1"`` in the shell itself, so ``cd`` and ``export``
persist, and ``command`` keeps a syntax error from ending the shell. ``__mf_main``
checks (reading /proc/self/stat, no fork) that the process about to print the
sentinel is the shell itself: ash lets a forked subshell that fails (``can't fork``
in a fork bomb) unwind into ``command eval`` and carry on with the control line,
and such a copy must exit instead of printing sentinels or reading commands. A single-quoted
word may span lines: the shell reads the whole word before it runs anything. fd 9
keeps a copy of the output pipe so the sentinel arrives even when a command closes
its stdout. The sentinels and the output cap are those of the local backend
(:mod:`megaflow.env.local.shell`).

Interrupting is done from outside the shell (a second ``docker exec`` that kills
every process but the protected ones), because POSIX sh has no way to unwind a
running ``eval``; a shell that does not come back is replaced.

File transfers go through the same shell as base64 (``base64`` and ``tar`` must be in
the image; busybox has both), so paths resolve inside the container and the same code
works under gVisor, whose file caching would hide writes made from the host.
"""

from __future__ import annotations

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INIT_SCRIPT = r"""
exec 9>&1 2>&1
__mf_pid=$$
__mf_main() { read -r __mf_me __mf_rest < /proc/self/stat && [ "$__mf_me" = "$__mf_pid" ]; }
__mf_run() { command eval "$1"; }
__mf_read() (
  PATH=__SAFE_PATH__
  if [ -d "$1" ]; then echo "is a directory"; exit 1; fi
  if [ ! -e "$1" ]; then echo "no such file"; exit 1; fi
  if [ ! -f "$1" ]; then echo "not a regular file"; exit 1; fi
  n=$(stat -c %s -- "$1" 2>/dev/null || wc -c < "$1") || exit 1
  if [ "$n" -gt "$2" ]; then echo "larger than $2 bytes"; exit 1; fi
  base64 < "$1"
)
__mf_write() (
  PATH=__SAFE_PATH__
  case $1 in */*)
    d=${1%/*}
    if [ -n "$d" ] && [ ! -d "$d" ]; then mkdir -p -- "$d" || exit 1; fi;;
  esac
  if [ -d "$1" ]; then echo "is a directory"; exit 1; fi
  printf %s "$2" | base64 -d > "$1" || exit 1
  # busybox base64 ignores write errors: a full quota shows as a short file.
  n=$(stat -c %s -- "$1") || exit 1
  if [ "$n" != "$3" ]; then
    echo "No space left on device: wrote $n of $3 bytes (the disk quota is full?)"; exit 1
  fi
)
__mf_untar() (
  PATH=__SAFE_PATH__
  mkdir -p -- "$2" || exit 1
  printf %s "$1" | base64 -d | tar -x -f - -C "$2" || exit 1
  # A restored archive never carries setuid/setgid bits (as on the local backend).
  find "$2" -perm /6000 -exec chmod ug-s {} + 2>/dev/null
  true
)
__mf_clear() (
  PATH=__SAFE_PATH__
  cd -- "$1" || exit 1
  rm -rf -- ./* ./.[!.]* ./..?*
)
__mf_tar() (
  PATH=__SAFE_PATH__
  tar -c -f - -C "$1" . | base64
)
__mf_pids() {
  for __mf_d in /proc/[0-9]*; do command printf ' %s' "${__mf_d#/proc/}"; done
}
""".replace("__SAFE_PATH__", SAFE_PATH)
"""Sent once when a shell starts: the helper functions."""

KILL_SCRIPT = r"""
me=$$
for round in 1 2 3 4 5; do
  left=0
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case " $* $me " in *" $p "*) continue;; esac
    kill -9 "$p" 2>/dev/null && left=1
  done
  [ $left = 0 ] && exit 0
done
exit 0
"""
"""Run as ``sh -c KILL_SCRIPT kill PID...``: SIGKILL every process but PID... and itself."""


def sh_quote(text: str) -> str:
    """``text`` as one POSIX single-quoted word (``text`` has no NUL)."""
    return "'" + text.replace("'", "'\\''") + "'"


def command_line(shell_code: str, nonce: str) -> bytes:
    """One control exchange: run ``shell_code`` (sh syntax), then the sentinel."""
    return (
        f"{shell_code} </dev/null >&9 2>&9 9>&-; __mf_s=$?; __mf_main || exit 0; "
        f"command printf '\\n__MF_DONE_%s__ %d\\n' {nonce} $__mf_s >&9\n"
    ).encode("utf-8", errors="surrogateescape")


def user_command_line(command: str, nonce: str) -> bytes:
    """The control line that ``eval``s a user command in the persistent shell."""
    return command_line(f"__mf_run {sh_quote(command)}", nonce)


def ready_line(nonce: str) -> bytes:
    """Init script, then a sentinel whose output is ``self:<shell pid> pids: <pids>``."""
    return INIT_SCRIPT.encode() + command_line(
        "command printf 'self:%s pids:' $$; __mf_pids", nonce
    )


def parse_ready(output: str) -> tuple[int, frozenset[int]]:
    """The shell's pid and the pids alive when it started (from :func:`ready_line`)."""
    head, _, pids = output.strip().rpartition("pids:")
    self_pid = int(head.strip().removeprefix("self:"))
    return self_pid, frozenset(int(p) for p in pids.split())
