"""One way to run a helper program (git, skopeo) from the event loop: in its own session,
and never outliving its caller."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

REAP_TIMEOUT_S = 10.0
"""How long a killed program is waited for (one stuck in the kernel is left to init)."""


async def run_program(
    argv: Sequence[str],
    *,
    timeout_s: float | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
) -> tuple[int, bytes, bytes]:
    """Run ``argv``; (exit status, stdout, stderr; stderr is in stdout with
    ``merge_stderr``). At ``timeout_s`` (TimeoutError) or when the caller is cancelled,
    its whole process group is SIGKILLed and reaped before the error propagates."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(process.wait()), REAP_TIMEOUT_S)
        raise
    return process.returncode or 0, out, err or b""
