"""The persistent shell of one Docker sandbox: exchanges, interrupts, restarts.

The shell is ``docker exec -i <container> /bin/sh``, attached over the daemon's
socket. When it starts it reports its own pid and the pids already running (the
container's init and its ``sleep``): those are *protected*. Interrupting a command
runs a second exec that SIGKILLs every unprotected process but the shell; if the
shell still does not answer (it was looping in a builtin) the shell is killed too
and a new one started. If no exec can even start (the pids limit is exhausted by a
fork bomb), the container is killed and started again: files of its image layer
persist, but ``/workspace`` and ``/tmp`` are tmpfs quota mounts and start empty (the
note says so: :data:`CONTAINER_RESTARTED`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import docker  # type: ignore[import-untyped]

from megaflow.core.errors import SandboxError
from megaflow.env.docker.engine import DockerEngine
from megaflow.env.docker.shell import KILL_SCRIPT, parse_ready, ready_line
from megaflow.env.docker.stream import ExecStream
from megaflow.env.shell import (
    SHELL_RESTARTED,
    Exchange,
    LineBuilder,
    OutputCollector,
    marker,
    new_nonce,
)

INTERRUPT_GRACE_S = 2.0
"""How long a timed-out command's shell gets to come back before it is replaced."""
SPAWN_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 15.0
CONTAINER_RESTARTED = (
    "[megaflow: the shell exited; a new shell was started in a restarted sandbox: "
    "/workspace and /tmp (memory-backed quota mounts) start empty]"
)


class ShellSession:
    """The shell of container ``container``; the caller serialises calls."""

    def __init__(self, engine: DockerEngine, container: str, sandbox_id: str) -> None:
        self._engine = engine
        self._container = container
        self._sandbox_id = sandbox_id
        self._stream: ExecStream | None = None
        self._exec_id = ""
        self._shell_pid = 0
        self._base: frozenset[int] = frozenset()
        self._stale: bytes | None = None
        self._pending_kill: asyncio.Task[bool] | None = None
        self.broken: str | None = None
        self.stopped = False
        """Set when the sandbox is being removed: a dead shell is then not replaced."""

    async def spawn(self) -> None:
        """Start a shell and wait until it answers with its pids."""

        def create(api: docker.APIClient) -> str:
            made = api.exec_create(
                self._container, ["/bin/sh"], stdin=True, stdout=True, stderr=True, tty=False
            )
            return str(made["Id"])

        self._exec_id = await self._engine.call("exec", create)
        stream = await ExecStream.start(
            self._engine.socket_path, self._engine.api_version, self._exec_id, SPAWN_TIMEOUT_S
        )
        self._stream = stream
        nonce = new_nonce()
        stream.write(ready_line(nonce))
        sink = OutputCollector(1 << 20)
        async with asyncio.timeout(SPAWN_TIMEOUT_S):
            status = await stream.reader.read_until(marker(nonce), sink)
        if status != 0:
            stream.close()
            raise SandboxError(
                f"sandbox {self._sandbox_id}: shell did not start (status {status}): "
                f"{sink.text().strip()[-2000:]}"
            )
        try:
            self._shell_pid, pids = parse_ready(sink.text())
        except ValueError as exc:
            stream.close()
            raise SandboxError(f"sandbox {self._sandbox_id}: odd shell greeting") from exc
        self._base = pids - {self._shell_pid}

    async def ready(self) -> str:
        """Resync after an abandoned command, or replace a dead shell; return a note."""
        if self.broken is not None:
            raise SandboxError(f"sandbox {self._sandbox_id} is broken: {self.broken}")
        if self._pending_kill is not None:
            with contextlib.suppress(Exception):
                await self._pending_kill
            self._pending_kill = None
        stream = self._stream
        if self._stale is not None and stream is not None and not stream.closed:
            stale, self._stale = self._stale, None
            if await self._interrupt(stale, OutputCollector(1024)) is not None:
                return ""
        self._stale = None
        await asyncio.sleep(0)  # let the loop notice a connection the daemon just closed
        if self._stream is not None and not self._stream.closed:
            return ""
        return await self.restart()

    async def exchange(self, line: LineBuilder, timeout_s: float, cap: int) -> Exchange:
        """Send one control line and collect its output until the sentinel."""
        stream = self._stream
        assert stream is not None
        nonce = new_nonce()
        sentinel = marker(nonce)
        sink = OutputCollector(cap)
        started = time.perf_counter()
        stream.write(line(nonce))
        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    status = await stream.reader.read_until(sentinel, sink)
            except TimeoutError:
                timed_out = True
                status = await self._interrupt(sentinel, sink)
        except BaseException:  # cancelled: kill the command now, resync on the next call
            self._stale = sentinel
            self._pending_kill = asyncio.ensure_future(self._kill(self._base | {self._shell_pid}))
            raise
        ex = Exchange(status, sink, timed_out, time.perf_counter() - started)
        if status is None:
            if self.stopped:
                raise SandboxError(f"sandbox {self._sandbox_id} was stopped while the command ran")
            ex.exit_code = await self._exit_code()
            try:
                ex.note = await self.restart()
            except SandboxError as exc:
                ex.note = f"[megaflow: the shell exited and could not be restarted: {exc}]"
        return ex

    async def restart(self) -> str:
        """Replace the shell: kill everything but the container's init, start a new one.
        Returns the note for the agent (the container's restart loses its tmpfs files)."""
        self.close()
        note = SHELL_RESTARTED
        try:
            if not await self._kill(self._base):
                await self._restart_container()
                note = CONTAINER_RESTARTED
            try:
                await self.spawn()
            except (SandboxError, TimeoutError):
                await self._restart_container()
                note = CONTAINER_RESTARTED
                await self.spawn()
        except (SandboxError, TimeoutError) as exc:
            self.close()
            self.broken = f"the shell could not be restarted: {exc}"
            raise SandboxError(f"sandbox {self._sandbox_id}: {self.broken}") from exc
        return note

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def _interrupt(self, sentinel: bytes, sink: OutputCollector) -> int | None:
        """Kill the running command; its status, or None once the shell was given up."""
        stream = self._stream
        assert stream is not None
        if await self._kill(self._base | {self._shell_pid}):
            try:
                async with asyncio.timeout(INTERRUPT_GRACE_S):
                    status = await stream.reader.read_until(sentinel, sink)
                if status is not None:
                    return status
            except TimeoutError:
                pass
        self.close()  # the shell does not come back (a builtin loop) or no exec can start
        return None

    async def _kill(self, keep: frozenset[int]) -> bool:
        """SIGKILL every process of the container but ``keep``; False if that failed."""
        argv = ["/bin/sh", "-c", KILL_SCRIPT, "kill", *(str(p) for p in sorted(keep))]

        def run(api: docker.APIClient) -> int | None:
            made = api.exec_create(self._container, argv, stdout=True, stderr=True)
            api.exec_start(made["Id"])
            code = api.exec_inspect(made["Id"]).get("ExitCode")
            return None if code is None else int(code)

        try:
            async with asyncio.timeout(KILL_TIMEOUT_S):
                return await self._engine.call("kill", run) == 0
        except (SandboxError, TimeoutError):
            return False

    async def _restart_container(self) -> None:
        """Kill and start the container again: every process dies, files persist."""

        def run(api: docker.APIClient) -> None:
            with contextlib.suppress(docker.errors.APIError):
                api.kill(self._container)
            api.wait(self._container, timeout=KILL_TIMEOUT_S)
            api.start(self._container)

        await self._engine.call("restart", run)

    async def _exit_code(self) -> int | None:
        """The dead shell's exit status (None if Docker does not know it yet)."""
        for _ in range(20):
            try:
                info = await self._engine.call(
                    "exec inspect", lambda api: api.exec_inspect(self._exec_id)
                )
            except SandboxError:
                return None
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            await asyncio.sleep(0.05)
        return None
