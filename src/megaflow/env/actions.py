"""Structured actions on an environment: read, write or edit a file, and scoring."""

from __future__ import annotations

import posixpath
import shlex

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env import backends
from megaflow.env.sandbox import Sandbox
from megaflow.v1 import env_pb2


def check_relative_path(path: str) -> str:
    """A workspace-relative path, or InvalidRequestError."""
    if not path or "\x00" in path:
        raise InvalidRequestError(f"invalid file path {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise InvalidRequestError(f"file path {path!r} must stay inside the workspace")
    return norm


SCORING_PATH = "/usr/local/bin:/usr/bin:/bin"


async def evaluate(
    sandbox: Sandbox,
    env_id: str,
    hidden_files: dict[str, bytes],
    eval_command: str,
    timeout_s: float,
) -> env_pb2.SubmitActionResponse:
    """Copy the hidden files in and run the evaluation from the workspace root."""
    if not eval_command:
        return env_pb2.SubmitActionResponse(ok=True, message="submitted; no evaluation configured")
    if not sandbox.alive:
        raise SandboxError(f"sandbox of {env_id} died before scoring")
    # Score in a fresh shell with a clean environment: none of the agent's functions,
    # aliases, exported variables (PYTHONPATH...) or background processes survive.
    await sandbox.execute("exit 0", timeout_s)
    for path, content in hidden_files.items():
        await sandbox.write_file(path, content)
    workdir = backends.workdir(sandbox)
    script = shlex.quote(f"cd {workdir} && {eval_command}")
    clean = f"env -i PATH={SCORING_PATH} HOME={workdir} LANG=C.UTF-8 /bin/sh -c {script}"
    result = await sandbox.execute(clean, timeout_s)
    passed = result.exit_code == 0 and not result.timed_out
    return env_pb2.SubmitActionResponse(
        ok=True,
        message="hidden tests passed" if passed else "hidden tests failed",
        has_reward=True,
        reward=1.0 if passed else 0.0,
        eval_output=result.output,
    )


async def file_action(
    sandbox: Sandbox, request: env_pb2.SubmitActionRequest
) -> env_pb2.SubmitActionResponse:
    action = request.WhichOneof("action")
    if action == "read_file":
        content = await sandbox.read_file(request.read_file.path)
        return env_pb2.SubmitActionResponse(
            ok=True, content=content, message=f"read {len(content)} bytes"
        )
    if action == "write_file":
        await sandbox.write_file(request.write_file.path, request.write_file.content)
        return env_pb2.SubmitActionResponse(ok=True, message=f"wrote {request.write_file.path}")
    edit = request.edit_file
    if not edit.old:
        raise InvalidRequestError("edit_file: `old` must not be empty")
    raw = await sandbox.read_file(edit.path)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidRequestError(f"edit_file: {edit.path} is not UTF-8 text") from None
    count = text.count(edit.old)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times; make it unique"
        raise InvalidRequestError(f"edit_file: the text to replace was {where} in {edit.path}")
    await sandbox.write_file(edit.path, text.replace(edit.old, edit.new, 1).encode())
    return env_pb2.SubmitActionResponse(ok=True, message=f"edited {edit.path}")
