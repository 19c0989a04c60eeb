"""Killing a local sandbox's processes, telling the platform's failures from the task's,
and removing what it leaves.

A mixin of :class:`~megaflow.env.local.LocalSandbox`: the attributes declared below
are the sandbox's own. Frozen processes cannot die (not even of SIGKILL, on cgroup
v1): every kill thaws first. A sandbox frozen by someone else, or whose bwrap outlives
SIGKILL, is *hung*; bwrap killed by a signal this class did not send was killed *from
outside*: both are the platform's failures (the sandbox breaks for good).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

from megaflow.core.errors import SandboxError
from megaflow.env.local import procs
from megaflow.env.local.cgroups import SandboxCgroups
from megaflow.env.local.freezer import frozen_now, thaw_if_frozen
from megaflow.env.local.process import ShellProcess
from megaflow.env.local.quota import unmount_sandbox


class SandboxKilling:
    """Kill, classify and clean up for a local sandbox."""

    sandbox_id: str
    host_workspace: Path
    _dir: Path
    _made_dir: bool
    _cgroups: SandboxCgroups
    _frozen: bool
    _shell: ShellProcess | None
    _broken: str | None
    _killed_bwrap: bool
    _oom_kills_at_spawn: int

    async def _fail_hung(self) -> None:
        """Kill everything; if the sandbox proved hung, it is broken: SandboxError."""
        if hung := await self._kill_processes():
            self._broken = f"hung: {hung}"
            raise SandboxError(f"sandbox {self.sandbox_id} {self._broken}")

    def _members(self) -> list[procs.Member]:
        """Every process of the sandbox, tagged with its pid inside (0: outer bwrap)."""
        if self._cgroups.dirs:
            return procs.classify(self._cgroups.pids())
        shell = self._shell
        ns = shell.pid_namespace() if shell is not None else None
        return procs.classify(procs.pids_in_namespace(ns)) if ns is not None else []

    def _kill_workload(self, *, signal_shell: bool) -> None:
        """SIGUSR1 the shell, then SIGKILL every process but bwrap's init and the shell.

        In that order: the shell's trap is pending while it waits for the command it
        runs, and runs (unwinding the command line) the moment that command dies. The
        other way round, a shell whose child was killed could run the rest of the line
        (``sleep 60; echo b``: the ``echo``) before the signal reached it."""
        members = self._members()
        if signal_shell:
            shell_pids = [m.host_pid for m in members if m.ns_pid == procs.SHELL_NS_PID]
            procs.kill(shell_pids, signal.SIGUSR1)
        procs.kill(m.host_pid for m in members if m.ns_pid > procs.SHELL_NS_PID)

    def _killed_from_outside(self, shell: ShellProcess) -> str | None:
        """Why bwrap is dead when a signal neither this object nor the sandbox's own
        memory limit sent killed it (``exit``, or the shell killed, end bwrap with a
        status instead; a task filling its memory, e.g. a tmpfs, may get bwrap itself
        chosen by the OOM killer of its cgroup: the task's doing)."""
        if shell.killed_by is None or self._killed_bwrap:
            return None
        if self._cgroups.oom_kills() > self._oom_kills_at_spawn:
            return None
        return f"bwrap was killed from outside (signal {shell.killed_by})"

    async def _kill_processes(self) -> str | None:
        """Kill everything in the sandbox and reap bwrap; the cgroups stay.

        Returns why the sandbox proved *hung*, if it did: frozen by someone else (frozen
        processes cannot die, so it is thawed first), or bwrap outliving SIGKILL.
        """
        hung = None
        if self._frozen or frozen_now(self._cgroups.dirs):
            if not self._frozen:
                hung = "frozen from outside: its processes could not run"
            self._frozen = False
            await asyncio.to_thread(thaw_if_frozen, self._cgroups.dirs)
        shell = self._shell
        if shell is not None:
            if shell.returncode is None:
                # Killing the namespace's init makes the kernel kill every process inside;
                # init goes first: if the shell died before it, init would report that
                # to the outer bwrap, which then exits without reaping init (a zombie
                # left to the host's init).
                members = self._members()
                procs.kill(m.host_pid for m in members if m.ns_pid == procs.INIT_NS_PID)
                procs.kill(m.host_pid for m in members if m.ns_pid > procs.INIT_NS_PID)
                try:
                    async with asyncio.timeout(1.0):
                        await shell.wait()
                except TimeoutError:
                    self._killed_bwrap = True
                    procs.kill([shell.pid])
                    try:
                        async with asyncio.timeout(5.0):
                            await shell.wait()
                    except TimeoutError as exc:
                        self._broken = "hung: bwrap outlives SIGKILL"
                        raise SandboxError(f"sandbox {self.sandbox_id}: bwrap survives") from exc
            shell.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while (left := self._cgroups.pids()) and loop.time() < deadline:
            if frozen_now(self._cgroups.dirs):  # frozen meanwhile (by a racing freeze)
                await asyncio.to_thread(thaw_if_frozen, self._cgroups.dirs)
            procs.kill(left)
            await asyncio.sleep(0.002)
        return hung

    def _remove_files(self) -> None:
        errors = []
        try:
            self._cgroups.remove(timeout_s=2.0)
        except SandboxError as exc:
            errors.append(str(exc))
        if self._made_dir:
            try:
                unmount_sandbox(self._dir)
            except SandboxError as exc:
                errors.append(str(exc))
            try:
                shutil.rmtree(self._dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"cannot remove {self._dir}: {exc}")
            self._made_dir = self._dir.exists()
        if errors:
            raise SandboxError(f"sandbox {self.sandbox_id}: cleanup failed: {'; '.join(errors)}")
