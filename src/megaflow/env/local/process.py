"""One sandbox process (outer bwrap, running bash inside) with its pipes.

Spawned with :class:`subprocess.Popen` and driven by the event loop directly: the
pipes are connected as asyncio transports and the exit is noticed through a pidfd,
so thousands of live sandboxes cost no helper thread each (asyncio's default child
watcher in Python 3.11 starts one thread per child).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from collections.abc import Sequence

from megaflow.env.local import procs
from megaflow.env.shell import ShellReader

_READ_LIMIT = 1 << 20


class ShellProcess:
    """A running sandbox: write control lines, read output, await its exit."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        reader: ShellReader,
        read_transport: asyncio.ReadTransport,
        writer: asyncio.WriteTransport,
        exited: asyncio.Future[int],
    ) -> None:
        self._popen = popen
        self.reader = reader
        self._read_transport = read_transport
        self._writer = writer
        self._exited = exited
        self.pid = popen.pid
        self._pid_ns: int | None = None

    @classmethod
    async def spawn(cls, argv: Sequence[str], pass_fds: Sequence[int] = ()) -> ShellProcess:
        """Start ``argv`` in its own session with piped stdin and merged stdout/stderr.

        The environment is minimal (``PATH`` only): the sandbox's pid 1 is bwrap, whose
        environment any process inside can read in ``/proc/1/environ``.
        """
        loop = asyncio.get_running_loop()
        popen = _popen(argv, pass_fds)
        assert popen.stdin is not None and popen.stdout is not None
        exited: asyncio.Future[int] = loop.create_future()
        _watch_exit(loop, popen, exited)
        read_transport: asyncio.ReadTransport | None = None
        try:
            stream = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
            read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stream, loop=loop), popen.stdout
            )
            writer, _ = await loop.connect_write_pipe(asyncio.Protocol, popen.stdin)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            if read_transport is not None:
                read_transport.close()
            await asyncio.shield(exited)
            raise
        return cls(popen, ShellReader(stream), read_transport, writer, exited)

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the shell's stdin (dropped if the pipe is closed)."""
        if not self._writer.is_closing():
            self._writer.write(data)

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (128+N for signal N), else None."""
        return self._exited.result() if self._exited.done() else None

    @property
    def killed_by(self) -> int | None:
        """The signal that ended bwrap itself, once reaped (None: it exited; bwrap
        reports a signal that ended the shell inside as the status 128+N instead)."""
        if not self._exited.done() or self._popen.returncode is None:
            return None
        return -self._popen.returncode if self._popen.returncode < 0 else None

    async def wait(self) -> int:
        """Wait for the process to exit and return its status."""
        return await asyncio.shield(self._exited)

    def pid_namespace(self) -> int | None:
        """Inode of the sandbox's pid namespace (the namespace of bwrap's child)."""
        if self._pid_ns is None:
            for child in procs.children(self.pid):
                self._pid_ns = procs.pid_namespace(child)
                break
        return self._pid_ns

    def close(self) -> None:
        """Close the pipes (call once the process is gone or being killed)."""
        self._writer.close()
        self._read_transport.close()


_LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def _popen(argv: Sequence[str], pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """fork+exec (vfork, well under a millisecond): what asyncio itself does inline."""
    return subprocess.Popen(
        list(argv),
        env=_LAUNCH_ENV,
        cwd="/",
        pass_fds=tuple(pass_fds),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )


def _status(popen: subprocess.Popen[bytes]) -> int:
    code = popen.returncode
    assert code is not None
    return 128 - code if code < 0 else code


def _watch_exit(
    loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes], exited: asyncio.Future[int]
) -> None:
    """Resolve ``exited`` when ``popen`` exits: a pidfd reader, else a waiter thread."""

    def done() -> None:
        if not exited.done():
            exited.set_result(_status(popen))

    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0:

        def on_ready() -> None:
            if popen.poll() is not None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                done()

        loop.add_reader(pidfd, on_ready)
        return

    def wait_thread() -> None:
        popen.wait()
        with contextlib.suppress(RuntimeError):  # loop closed
            loop.call_soon_threadsafe(done)

    threading.Thread(target=wait_thread, name=f"wait-{popen.pid}", daemon=True).start()
