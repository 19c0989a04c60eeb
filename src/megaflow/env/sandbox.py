"""The interface every sandbox backend implements, whatever isolates it.

`LocalSandbox` (bubblewrap + cgroups, `megaflow.env.local`) and `DockerSandbox`
(Docker Engine, runc or gVisor, `megaflow.env.docker`) both satisfy `Sandbox`; the
Environment Service holds sandboxes only through this interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


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


class Sandbox(Protocol):
    """One isolated environment with a persistent shell and a writable workdir."""

    sandbox_id: str

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

    async def suspend(self) -> None:
        """Freeze every process (cgroup freezer / docker pause); `resume` thaws them."""
        ...

    async def resume(self) -> None: ...

    async def snapshot(self) -> bytes:
        """A tar archive of the workdir's current state (its changes since start)."""
        ...

    async def restore(self, archive: bytes) -> None:
        """Replace the workdir's content with a `snapshot` archive."""
        ...

    async def stop(self) -> None:
        """Idempotent: kill everything, remove every trace (processes, cgroups, dirs)."""
        ...
