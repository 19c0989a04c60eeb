"""``LocalSandbox``: a bubblewrap sandbox on this machine with one persistent bash.

Life of a sandbox::

    sb = LocalSandbox("sb-1", root_dir=Path("/var/lib/megaflow/sandboxes"))
    await sb.start()                      # folder, owner file, cgroups, bwrap + bash
    r = await sb.execute("cd src && export X=1", timeout_s=10)
    r = await sb.execute("echo $X; pwd", timeout_s=10)   # "1\\n/workspace/src\\n"
    await sb.stop()                       # no process, cgroup or folder remains

Host layout: ``root_dir/<sandbox_id>/`` holds ``owner.json`` (see
:mod:`megaflow.env.local.owner`), ``workspace/`` (``/workspace`` inside),
``inbox/`` (read-only inside; uploads for :meth:`LocalSandbox.write_file`) and
``sockets/`` (read-only inside as ``/run/megaflow``: unix sockets the agent offers the
sandbox, see ``Capabilities.host_sockets``).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.local import workspace
from megaflow.env.local.bwrap import (
    INBOX,
    WORKDIR,
    bwrap_argv,
    image_has_bash,
    launcher_argv,
)
from megaflow.env.local.cgroups import CPU_SHARES_DEFAULT, SandboxCgroups, cgroup_layout
from megaflow.env.local.features import SandboxFeatures
from megaflow.env.local.freezer import frozen_now
from megaflow.env.local.killing import SandboxKilling
from megaflow.env.local.owner import Owner
from megaflow.env.local.process import ShellProcess
from megaflow.env.local.quota import default_disk_mib, default_tmp_mib, mount_quota
from megaflow.env.local.seccomp import filter_program
from megaflow.env.local.shell import ansi_c_quote, command_line, ready_line, user_command_line
from megaflow.env.sandbox import Capabilities, SandboxLifecycle
from megaflow.env.shell import (
    SHELL_RESTARTED,
    Exchange,
    LineBuilder,
    OutputCollector,
    ShellSandbox,
    marker,
    new_nonce,
    sandbox_path,
)

MAX_FILE_BYTES = 8 * 1024 * 1024
"""Largest file :meth:`LocalSandbox.read_file` / :meth:`LocalSandbox.write_file` move."""
FILE_OP_TIMEOUT_S = 60.0
INTERRUPT_GRACE_S = 2.0
"""How long a timed-out command's shell gets to come back before it is replaced."""
RESTART_TIMEOUT_S = 10.0
HANG_CHECK_S = 1.0
"""While a command runs, how often the sandbox checks it was not frozen from outside."""
SANDBOX_UID = 61_000
"""The unprivileged host uid (and gid) the workload runs as by default: root (uid 0)
only inside its user namespace. No host user should own files under this uid."""

_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BASH_PREFIX = re.compile(r"^[\w./-]+: line \d+: ", re.MULTILINE)


class LocalSandbox(SandboxLifecycle, SandboxFeatures, SandboxKilling, ShellSandbox):
    """A bubblewrap sandbox with a persistent shell, memory and pids limits.

    Not safe to share between event loops. Calls on one sandbox are serialised;
    :meth:`stop` may be called at any time, also while a command runs.

    Arguments:

    - ``sandbox_id``: names the folder and the cgroups: letters, digits, ``_.-``, <= 64.
    - ``root_dir``: host folder holding one sub-folder per sandbox.
    - ``image_root``: its ``usr``, ``etc``, ``opt``, ``bin``, ``lib*`` and ``sbin``
      make the read-only root (``/etc/shadow`` and the like are masked).
    - ``memory_mib``: memory limit of the whole sandbox, shell included (when the
      machine has a memory cgroup; see :func:`~megaflow.env.local.cgroup_support`).
    - ``pids``: process limit of the whole sandbox, counting bwrap's two processes and
      the shell (when the machine has a pids cgroup).
    - ``output_bytes``: output kept per command: the first and last halves.
    - ``extra_path``: folders (inside the sandbox) appended to ``PATH``.
    - ``cpu_shares``: relative CPU weight in v1 ``cpu.shares`` units (default 1024 = an
      equal share; v2 gets the matching ``cpu.weight``), when the machine has a cpu cgroup.
    - ``disk_mib``: workspace quota in MiB (the sandbox folder is a tmpfs of that size
      and :func:`~megaflow.env.local.quota.inodes_for` inodes; a write beyond it fails
      with ENOSPC, see :mod:`megaflow.env.local.quota`); 0: the default, half of
      ``memory_mib``. There is no unlimited workspace.
    - ``tmp_mib``: ``/tmp`` quota in MiB, likewise; 0: a quarter of ``memory_mib``.
    - ``uid``: the unprivileged host uid (and gid) the workload runs as (mapped to 0
      inside its user namespace); never 0.

    The image must provide ``bash`` (the persistent shell's protocol needs it); an image
    without one is refused with InvalidRequestError.

    :meth:`suspend` freezes every process through the cgroup freezer; any later call that
    uses the shell (:meth:`execute`, file operations) resumes the sandbox first.

    If the shell dies (``exit``, killed for memory), the next call starts a new one in
    the same sandbox: ``/workspace`` and the cgroups persist, while ``/tmp``, the
    environment and the working folder start afresh; the output says so.

    What the task cannot cause is the platform's failure, and breaks the sandbox for
    good (SandboxError, retryable, on that call and every later one): bwrap itself
    killed by a signal this class did not send (``docker kill``, a node's OOM killer),
    or a sandbox found *hung*: frozen by someone else (``docker pause``, a stuck
    freezer; checked every :data:`HANG_CHECK_S` while a command runs), or, at a
    command's timeout, bwrap outliving SIGKILL.
    """

    WORKDIR = WORKDIR
    capabilities: ClassVar[Capabilities] = Capabilities(
        suspend=True, snapshot=True, host_workspace=True, host_sockets=True
    )

    def __init__(
        self,
        sandbox_id: str,
        *,
        root_dir: Path,
        image_root: Path = Path("/"),
        memory_mib: int = 1024,
        pids: int = 256,
        output_bytes: int = 64_000,
        extra_path: Sequence[str] = (),
        cpu_shares: int = CPU_SHARES_DEFAULT,
        disk_mib: int = 0,
        writable_dirs: Sequence[str] = (),
        tmp_mib: int = 0,
        uid: int = SANDBOX_UID,
    ) -> None:
        if not _SANDBOX_ID.fullmatch(sandbox_id):
            raise InvalidRequestError(f"invalid sandbox id {sandbox_id!r}")
        if memory_mib < 16 or pids < 8 or output_bytes < 256:
            raise InvalidRequestError(
                f"sandbox limits too small: memory_mib={memory_mib} (min 16), "
                f"pids={pids} (min 8), output_bytes={output_bytes} (min 256)"
            )
        if (
            not 2 <= cpu_shares <= 262144
            or not 0 <= disk_mib <= 1024 * 1024
            or not 0 <= tmp_mib <= 1024 * 1024
        ):
            raise InvalidRequestError(
                f"cpu_shares={cpu_shares} (2..262144), disk_mib={disk_mib} or "
                f"tmp_mib={tmp_mib} (0..1048576) out of range"
            )
        if not 0 < uid < 2**32 - 1:
            raise InvalidRequestError(f"sandbox uid {uid} must be an unprivileged uid (not 0)")
        if any(":" in p or "\0" in p or not p.startswith("/") for p in extra_path):
            raise InvalidRequestError(f"extra_path entries must be absolute: {extra_path!r}")
        bad = [p for p in writable_dirs if not _writable_dir_ok(p)]
        if bad:
            raise InvalidRequestError(
                f"writable_dirs must be absolute, normalized and outside the sandbox's own "
                f"folders (/workspace, /tmp, /proc, /dev, /run/megaflow, /.megaflow): {bad!r}"
            )
        super().__init__(sandbox_id)
        self._root_dir = Path(root_dir)
        self._dir = self._root_dir / sandbox_id
        self.host_workspace: Path = self._dir / "workspace"
        """Host folder seen as /workspace inside the sandbox."""
        self._inbox = self._dir / "inbox"
        self.host_socket_dir: Path = self._dir / "sockets"
        """Host folder seen (read-only) as /run/megaflow inside the sandbox."""
        self._image_root = Path(image_root)
        self._memory_mib = memory_mib
        self._pids = pids
        self._output_bytes = output_bytes
        self._extra_path = tuple(extra_path)
        self._writable = tuple(
            (self._dir / "writable" / p.strip("/").replace("/", "%"), p) for p in writable_dirs
        )
        self._cpu_shares = cpu_shares
        self._disk_mib = disk_mib or default_disk_mib(memory_mib)
        self._tmp_mib = tmp_mib or default_tmp_mib(memory_mib)
        self._tmp = self._dir / "tmp"
        self.uid = uid
        """The host uid (and gid) of the workload."""
        self._frozen = False
        self._made_dir = False
        self._cgroups = SandboxCgroups(())
        self._shell: ShellProcess | None = None
        self._lock = asyncio.Lock()
        self._stale: bytes | None = None  # sentinel of a command abandoned by cancellation
        self._broken: str | None = None
        self._killed_bwrap = False  # this object SIGKILLed bwrap (not the outside world)
        self._oom_kills_at_spawn = 0  # the memory limit's kills before this shell

    # -- lifecycle -----------------------------------------------------------------

    async def _boot(self) -> None:
        """Create the folders and cgroups and start bwrap + bash (SandboxLifecycle.start)."""
        self._prepare()
        await self._spawn()

    @property
    def alive(self) -> bool:
        """True from a successful start() until stop(), unless the sandbox broke for good.

        A shell that exited (``exit``, killed for memory) still counts as alive: the next
        call starts a new one.
        """
        return self._state == "running" and self._broken is None

    # -- commands and files ----------------------------------------------------------

    def _user_line(self, command: str, nonce: str) -> bytes:
        return user_command_line(command, nonce)

    async def read_file(self, path: str) -> bytes:
        """Read a file as the sandbox sees it (symlinks resolve inside the sandbox)."""
        target = _sandbox_path(path)
        cap = 4 * (MAX_FILE_BYTES // 3 + 2) + 4096
        code = f"__mf_read {ansi_c_quote(target)} {MAX_FILE_BYTES + 1}"
        async with self._lock:
            await self._ready_shell()
            ex = await self._exchange(lambda n: command_line(code, n), FILE_OP_TIMEOUT_S, cap)
        self._check_file_op("read_file", path, ex)
        try:
            data = base64.b64decode(ex.sink.raw(), validate=True)
        except ValueError as exc:
            raise SandboxError(f"read_file {path!r}: garbled transfer") from exc
        if len(data) > MAX_FILE_BYTES:
            raise InvalidRequestError(f"read_file {path!r}: larger than {MAX_FILE_BYTES} bytes")
        return data

    async def write_file(self, path: str, content: bytes) -> None:
        """Write ``content`` to ``path`` inside the sandbox, creating parent folders.

        Relative paths are relative to /workspace. The write happens inside the
        sandbox, so read-only places and symlinks behave as they do for commands.
        """
        target = _sandbox_path(path)
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise InvalidRequestError("write_file content must be bytes")
        data = bytes(content)
        if len(data) > MAX_FILE_BYTES:
            raise InvalidRequestError(
                f"write_file {path!r}: {len(data)} bytes is more than {MAX_FILE_BYTES}"
            )
        async with self._lock:
            await self._ready_shell()
            upload = self._inbox / new_nonce()
            try:
                if len(data) > 256 * 1024:
                    await asyncio.to_thread(upload.write_bytes, data)
                else:
                    upload.write_bytes(data)
            except OSError as exc:
                upload.unlink(missing_ok=True)
                if exc.errno == errno.ENOSPC:
                    raise InvalidRequestError(
                        f"write_file {path!r}: no space left on device (the sandbox's disk "
                        "quota is full)"
                    ) from exc
                raise
            code = f"__mf_write {ansi_c_quote(target)} {INBOX}/{upload.name}"
            try:
                ex = await self._exchange(lambda n: command_line(code, n), FILE_OP_TIMEOUT_S, 65536)
            finally:
                upload.unlink(missing_ok=True)
        self._check_file_op("write_file", path, ex)

    async def cwd(self) -> str:
        """The persistent shell's current folder."""
        async with self._lock:
            await self._ready_shell()
            ex = await self._exchange(
                lambda n: command_line('builtin printf %s "$PWD"', n), FILE_OP_TIMEOUT_S, 65536
            )
        if ex.status != 0:
            raise SandboxError(f"sandbox {self.sandbox_id}: cannot read cwd")
        return ex.sink.raw().decode("utf-8", errors="surrogateescape")

    # -- internals ---------------------------------------------------------------------

    def _prepare(self) -> None:
        """Sandbox folder, owner file (written before the cgroups exist), cgroups."""
        if not image_has_bash(self._image_root):
            raise InvalidRequestError(
                f"image {self._image_root} has no bash (/usr/bin/bash or /bin/bash): "
                "local sandbox images need bash"
            )
        layout = cgroup_layout()
        name = f"megaflow-{self.sandbox_id}-{secrets.token_hex(4)}"
        self._root_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        searchable(self._root_dir)
        try:
            self._dir.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise SandboxError(f"sandbox folder {self._dir} already exists") from exc
        self._made_dir = True
        # The folder is the workspace quota's tmpfs: the binds from it show paths
        # relative to it (/workspace), never the host's, in the sandbox's mountinfo.
        # 0711: the sandbox's uid (bwrap resolves its bind sources by path) may pass,
        # nobody may list; every folder below is 0700 and the sandbox uid's alone, so
        # no other host user reaches the workspace.
        mount_quota(self._dir, self._disk_mib, mode=0o711)
        Owner.current(tuple(base / name for _, base in layout.bases)).write(self._dir)
        uid = self.uid
        # The sandbox's user owns its socket folder; what the agent puts there (sockets,
        # key files) is handed to the folder's owner (see megaflow.agent.model_endpoint).
        for folder in (self.host_workspace, self._inbox, self.host_socket_dir):
            folder.mkdir(mode=0o700)
            os.chown(folder, uid, uid)
        for host, _ in self._writable:
            host.mkdir(mode=0o700, parents=True)
            os.chown(host, uid, uid)
            os.chown(host.parent, uid, uid)
        self._tmp.mkdir(mode=0o700)
        mount_quota(self._tmp, self._tmp_mib, mode=0o700, uid=uid, gid=uid, name="megaflow-tmp")
        self._cgroups = SandboxCgroups.create(
            layout,
            name,
            memory_bytes=self._memory_mib * 1024 * 1024,
            pids=self._pids,
            cpu_shares=self._cpu_shares,
        )

    async def _spawn(self) -> None:
        """Start bwrap + bash and wait until the shell answers.

        The unprivileged bwrap resolves its bind sources by path: a parent folder that
        someone closed meanwhile (pytest resets its 0700 base folder at every session
        start, for one) is opened again, and the start tried once more."""
        try:
            await self._spawn_once()
        except SandboxError as exc:
            if "Can't find source path" not in str(exc) or "Permission denied" not in str(exc):
                raise
            await self._spawn_once()

    async def _spawn_once(self) -> None:
        searchable(self._root_dir)  # again: someone may have closed it meanwhile
        searchable(self._image_root)  # e.g. in an image cache under a 0700 home
        program = filter_program()
        seccomp_fd: int | None = None
        if program is not None:  # a pipe per spawn: bwrap reads the program from it
            seccomp_fd, write_end = os.pipe()
            try:
                os.write(write_end, program)  # < 1 KiB: fits in the pipe buffer
            finally:
                os.close(write_end)
        argv = launcher_argv(
            bwrap_argv(
                image_root=self._image_root,
                workspace=self.host_workspace,
                inbox=self._inbox,
                hostname="sandbox",
                sockets=self.host_socket_dir,
                extra_path=self._extra_path,
                seccomp_fd=seccomp_fd,
                writable_dirs=self._writable,
                tmp=self._tmp,
            ),
            self._cgroups.procs_files,
            self.uid,
        )
        try:
            shell = await ShellProcess.spawn(argv, () if seccomp_fd is None else (seccomp_fd,))
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        self._shell = shell
        self._killed_bwrap = False
        self._oom_kills_at_spawn = self._cgroups.oom_kills()
        nonce = new_nonce()
        shell.write(ready_line(nonce))
        sink = OutputCollector(16384)
        if await shell.reader.read_until(marker(nonce), sink) is None:
            code = await shell.wait()
            shell.close()
            raise SandboxError(
                f"sandbox {self.sandbox_id}: shell did not start (exit {code}): "
                f"{sink.text().strip()[-2000:]}"
            )

    async def _ready_shell(self) -> str:
        """Check the sandbox is usable; resync or restart the shell; return a note."""
        if self._state != "running":
            raise SandboxError(f"sandbox {self.sandbox_id} is not running ({self._state})")
        if self._broken is not None:
            raise SandboxError(f"sandbox {self.sandbox_id} is broken: {self._broken}")
        if self._frozen:
            await self._set_frozen(False)
        shell = self._shell
        if self._stale is not None and shell is not None and shell.returncode is None:
            stale, self._stale = self._stale, None
            if await self._interrupt(stale, OutputCollector(1024)) is not None:
                return ""
        self._stale = None
        if shell is not None and shell.returncode is None and not shell.reader.eof:
            return ""
        if shell is not None and (why := self._killed_from_outside(shell)):
            await self._kill_processes()
            self._broken = why
            raise SandboxError(f"sandbox {self.sandbox_id} died: {why}")
        await self._restart()
        return SHELL_RESTARTED

    async def _restart(self) -> None:
        """Replace a dead or hopeless shell (workspace and cgroups persist, /tmp starts
        empty)."""
        await self._kill_processes()
        await asyncio.to_thread(workspace.clear, self._tmp)
        try:
            async with asyncio.timeout(RESTART_TIMEOUT_S):
                await self._spawn()
        except (TimeoutError, SandboxError, OSError) as exc:
            await self._kill_processes()
            self._broken = f"the shell could not be restarted: {exc}"
            raise SandboxError(f"sandbox {self.sandbox_id}: {self._broken}") from exc
        if self._state != "running":
            await self._kill_processes()
            raise SandboxError(f"sandbox {self.sandbox_id} was stopped")

    async def _exchange(self, line: LineBuilder, timeout_s: float, cap: int) -> Exchange:
        """Send one control line and collect its output until the sentinel."""
        shell = self._shell
        assert shell is not None
        nonce = new_nonce()
        sentinel = marker(nonce)
        sink = OutputCollector(cap)
        started = time.perf_counter()
        shell.write(line(nonce))
        timed_out = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout_at(min(deadline, loop.time() + HANG_CHECK_S)):
                        status = await shell.reader.read_until(sentinel, sink)
                    break
                except TimeoutError:
                    if loop.time() >= deadline:
                        timed_out = True
                        status = await self._interrupt(sentinel, sink)
                        break
                    if not self._frozen and frozen_now(self._cgroups.dirs):
                        await self._fail_hung()  # frozen from outside: do not wait it out
        except BaseException:  # cancelled: stop the command now, resync on the next call
            self._stale = sentinel
            self._kill_workload(signal_shell=True)
            raise
        ex = Exchange(status, sink, timed_out, time.perf_counter() - started)
        if status is None:
            await self._after_shell_death(ex)
        return ex

    async def _after_shell_death(self, ex: Exchange) -> None:
        """The shell died under a command: record why, and start a new one."""
        shell = self._shell
        assert shell is not None
        await self._kill_processes()
        ex.exit_code = shell.returncode
        if self._state != "running":
            raise SandboxError(f"sandbox {self.sandbox_id} was stopped while the command ran")
        if why := self._killed_from_outside(shell):
            self._broken = why
            raise SandboxError(f"sandbox {self.sandbox_id} died under its command: {why}")
        try:
            await self._restart()
        except SandboxError as exc:
            ex.note = f"[megaflow: the shell exited and could not be restarted: {exc}]"
            return
        ex.note = SHELL_RESTARTED

    async def _interrupt(self, sentinel: bytes, sink: OutputCollector) -> int | None:
        """Kill the running command; return its status, or None if the shell was replaced."""
        shell = self._shell
        assert shell is not None
        if not self._frozen and frozen_now(self._cgroups.dirs):  # nothing in it can run
            await self._fail_hung()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INTERRUPT_GRACE_S
        wait_s = 0.01
        while loop.time() < deadline and shell.returncode is None:
            self._kill_workload(signal_shell=True)
            try:
                async with asyncio.timeout(wait_s):
                    status = await shell.reader.read_until(sentinel, sink)
            except TimeoutError:
                wait_s = min(wait_s * 2, 0.2)
                continue
            if status is not None:
                await self._absorb_job_reports()
            return status
        # The shell does not come back (it ignores the trap, or exec'd something else),
        # or the sandbox hangs: then it is the platform's failure, not the task's.
        await self._fail_hung()
        try:
            async with asyncio.timeout(1.0):
                return await shell.reader.read_until(sentinel, sink)
        except TimeoutError:
            return None

    async def _absorb_job_reports(self) -> None:
        """Reap the killed background jobs now, so bash's "Killed" reports about them
        do not open the next command's output; a shell that hangs here is killed."""
        shell = self._shell
        assert shell is not None
        nonce = new_nonce()
        shell.write(command_line("builtin wait", nonce))
        try:
            async with asyncio.timeout(1.0):
                if await shell.reader.read_until(marker(nonce), OutputCollector(4096)) is not None:
                    return
        except TimeoutError:
            pass
        await self._kill_processes()  # the next call starts a new shell

    async def _teardown(self) -> None:
        """Kill, then remove cgroups and the sandbox folder (blocking parts in a thread)."""
        try:
            await self._kill_processes()
        finally:
            await asyncio.to_thread(self._remove_files)

    def _check_file_op(self, op: str, path: str, ex: Exchange) -> None:
        if ex.timed_out:
            raise SandboxError(f"{op} {path!r}: timed out after {FILE_OP_TIMEOUT_S} s")
        if ex.status is None:
            raise SandboxError(f"{op} {path!r}: the shell died ({ex.note})")
        if ex.status != 0:
            message = _BASH_PREFIX.sub("", ex.sink.text()).strip() or f"exit status {ex.status}"
            raise InvalidRequestError(f"{op} {path!r}: {message}")


def searchable(folder: Path) -> None:
    """Let every host user search (not list) ``folder`` and its parents: the sandbox's
    unprivileged bwrap resolves its bind sources by path. Only folders lacking the
    others' search bit are changed."""
    for path in (folder, *folder.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _sandbox_path(path: str) -> str:
    """Validate a sandbox path; relative paths are taken relative to /workspace."""
    return sandbox_path(path, WORKDIR)


_OWN_DIRS = ("/workspace", "/tmp", "/proc", "/dev", "/run/megaflow", "/.megaflow")


def _writable_dir_ok(path: str) -> bool:
    """An extra writable folder: absolute, normalized, not / and not over the sandbox's own."""
    if not path.startswith("/") or path == "/" or os.path.normpath(path) != path:
        return False
    return not any(
        path == d or path.startswith(d + "/") or d.startswith(path + "/") for d in _OWN_DIRS
    )
