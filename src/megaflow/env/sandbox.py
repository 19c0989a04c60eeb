"""The interface every sandbox backend implements, whatever isolates it.

`LocalSandbox` (bubblewrap + cgroups, `megaflow.env.local`) and `DockerSandbox`
(Docker Engine, runc or gVisor, `megaflow.env.docker`) both satisfy `Sandbox`; the
Environment Service holds sandboxes only through this interface.

What a sandbox can do beyond the core is *declared* in its `capabilities`
(`Capabilities`); the methods of each capability form their own protocol
(`SuspendableSandbox`, `SnapshotSandbox`, `RecreatableSandbox`), and
`megaflow.env.backends` calls them only where the sandbox declares them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Protocol, Self

from megaflow.core.errors import SandboxError


@dataclass(frozen=True)
class CommandResult:
    """What one command did."""

    output: str
    """stdout and stderr merged, UTF-8 decoded (bad bytes replaced), maybe truncated."""
    exit_code: int
    """The command's exit status; 137 when it was killed (timeout, out of memory)."""
    timed_out: bool
    """Whether the command ran past its timeout and was killed."""
    truncated: bool
    """Whether output was dropped (the output then holds a marker where)."""
    duration_s: float
    """Wall time from sending the command to its result."""


SOCKET_DIR = "/run/megaflow"
"""Where a sandbox with the ``host_sockets`` capability sees its host socket folder."""


@dataclass(frozen=True)
class Capabilities:
    """What a sandbox backend can do beyond the core `Sandbox` protocol (declared by the
    backend, never probed)."""

    suspend: bool = False
    """`SuspendableSandbox`: freeze every process while the agent waits, thaw later."""
    snapshot: bool = False
    """`SnapshotSandbox`: the workdir as a tar archive, and restoring one (snapshots,
    ``restore_from``, and a persistent pool's reset to the pristine workdir)."""
    host_workspace: bool = False
    """`HostWorkspaceSandbox`: the workdir is a directory on the service's host, so a
    large repository is written there directly instead of through an archive."""
    recreate: bool = False
    """`RecreatableSandbox`: a persistent pool's reset replaces the whole sandbox (nothing
    of the previous tenant survives, outside the workdir included) instead of restarting
    the shell and restoring the workdir."""
    host_sockets: bool = False
    """`HostSocketSandbox`: a host folder is bound (read-only) at ``/run/megaflow`` inside,
    where the agent can put unix sockets for the sandbox's programs to connect to (the
    only way out of a sandbox without network, e.g. to a CLI agent's model endpoint)."""


class Sandbox(Protocol):
    """One isolated environment with a persistent shell and a writable workdir."""

    sandbox_id: str
    capabilities: ClassVar[Capabilities]
    """What this sandbox can do beyond this protocol (see `Capabilities`)."""

    @property
    def workdir(self) -> str:
        """The agent's working directory inside the sandbox (e.g. /workspace)."""
        ...

    @property
    def alive(self) -> bool: ...

    async def start(self, timeout_s: float = 30.0) -> None:
        """Create and boot the sandbox; SandboxError (or DeadlineExceededError) if it cannot."""
        ...

    async def put_files(self, files: Mapping[str, bytes]) -> None:
        """Write the task's repository into the fresh workdir (paths relative to it)."""
        ...

    async def execute(self, command: str, timeout_s: float) -> CommandResult: ...

    async def read_file(self, path: str) -> bytes: ...

    async def write_file(self, path: str, content: bytes) -> None: ...

    async def cwd(self) -> str: ...

    async def stop(self) -> None:
        """Idempotent: kill everything, remove every trace (processes, cgroups, dirs)."""
        ...


class SuspendableSandbox(Sandbox, Protocol):
    """A sandbox whose `capabilities` declare ``suspend``."""

    async def suspend(self) -> None:
        """Freeze every process (cgroup freezer / docker pause); `resume` thaws them."""
        ...

    async def resume(self) -> None: ...


class SnapshotSandbox(Sandbox, Protocol):
    """A sandbox whose `capabilities` declare ``snapshot``."""

    async def snapshot(self) -> bytes:
        """A tar archive of the workdir's current state (its changes since start)."""
        ...

    async def restore(self, archive: bytes) -> None:
        """Replace the workdir's content with a `snapshot` archive."""
        ...


class HostWorkspaceSandbox(Sandbox, Protocol):
    """A sandbox whose `capabilities` declare ``host_workspace``."""

    host_workspace: Path
    """The workdir's directory on the host (the sandbox sees it as `workdir`)."""


class HostSocketSandbox(Sandbox, Protocol):
    """A sandbox whose `capabilities` declare ``host_sockets``."""

    host_socket_dir: Path
    """The host folder the sandbox sees as ``/run/megaflow`` (read-only; a unix socket
    made there can be connected to from inside)."""


class RecreatableSandbox(Sandbox, Protocol):
    """A sandbox whose `capabilities` declare ``recreate``."""

    async def recreate(self, timeout_s: float = 30.0) -> None:
        """Replace the sandbox by a fresh one of the same spec (a persistent pool's reset)."""
        ...


SandboxState = Literal["new", "starting", "running", "stopped"]


class SandboxLifecycle:
    """The start/stop state machine every backend shares: new → starting → running →
    stopped. A backend implements `_boot` (runs inside the start budget) and
    `_teardown` (idempotent: removes whatever exists); errors of `_BOOT_ERRORS` from
    `_boot` are reported as a `SandboxError` saying the sandbox failed to start."""

    _BOOT_ERRORS: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self._state: SandboxState = "new"

    async def _boot(self) -> None:
        raise NotImplementedError

    async def _teardown(self) -> None:
        raise NotImplementedError

    async def start(self, timeout_s: float = 30.0) -> None:
        """Boot the sandbox; SandboxError (after a full teardown) if it cannot."""
        if self._state != "new":
            raise SandboxError(f"sandbox {self.sandbox_id} was already started")
        self._state = "starting"
        try:
            async with asyncio.timeout(timeout_s):
                await self._boot()
        except BaseException as exc:
            self._state = "stopped"
            await self._teardown()
            if isinstance(exc, TimeoutError):
                raise SandboxError(
                    f"sandbox {self.sandbox_id} did not start within {timeout_s} s"
                ) from exc
            if isinstance(exc, self._BOOT_ERRORS):
                raise SandboxError(f"sandbox {self.sandbox_id} failed to start: {exc}") from exc
            raise
        if self._state != "starting":  # stop() came while starting
            await self._teardown()
            raise SandboxError(f"sandbox {self.sandbox_id} was stopped while starting")
        self._state = "running"

    async def stop(self) -> None:
        """Tear the sandbox down (see the backend's `_teardown`). Idempotent."""
        previous, self._state = self._state, "stopped"
        if previous in ("new", "stopped"):
            return
        await self._teardown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
