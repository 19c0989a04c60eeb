"""Structured actions on an environment: read, write or edit a file, and scoring."""

from __future__ import annotations

import posixpath
import shlex

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env import backends
from megaflow.env.evaluation.spec import read_spec
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
    """Copy the hidden files in and run the evaluation from the workspace root.

    The exit status of ``eval_command`` is the reward, unless the hidden files carry an
    `EvalSpec` (`megaflow.env.evaluation`): then its test log (per-test outcomes,
    reward 1 only if all pass) or its reward file decides."""
    if not eval_command:
        return env_pb2.SubmitActionResponse(ok=True, message="submitted; no evaluation configured")
    if not sandbox.alive:
        raise SandboxError(f"sandbox of {env_id} died before scoring")
    try:
        spec = read_spec(hidden_files)
    except ValueError as exc:
        raise InvalidRequestError(f"the task's evaluation spec is invalid: {exc}") from None
    # Score in a fresh shell with a clean environment: none of the agent's functions,
    # aliases, exported variables (PYTHONPATH...) or background processes survive.
    await sandbox.execute("exit 0", timeout_s)
    for path, content in hidden_files.items():
        await sandbox.write_file(path, content)
    for path in spec.outputs() if spec is not None else ():
        await sandbox.write_file(path, b"")  # nothing the agent left there counts
    workdir = backends.workdir(sandbox)
    script = shlex.quote(f"cd {workdir} && {eval_command}")
    clean = f"env -i PATH={SCORING_PATH} HOME={workdir} LANG=C.UTF-8 /bin/sh -c {script}"
    result = await sandbox.execute(clean, timeout_s)
    if spec is None:
        passed = result.exit_code == 0 and not result.timed_out
        return env_pb2.SubmitActionResponse(
            ok=True,
            message="hidden tests passed" if passed else "hidden tests failed",
            has_reward=True,
            reward=1.0 if passed else 0.0,
            eval_output=result.output,
        )
    outputs = {path: await _read_output(sandbox, path) for path in spec.outputs()}
    reward, tests = spec.score(outputs)
    log = (outputs.get(spec.log_path) or b"").decode(errors="replace") if spec.tests else ""
    failing = sum(1 for t in tests if t.status != "passed")
    message = (
        f"{len(tests) - failing} of {len(tests)} tests passed"
        if tests
        else f"reward {reward:g} (from {spec.reward_path or 'the evaluation'})"
    )
    if result.timed_out:
        message += "; the evaluation timed out"
    return env_pb2.SubmitActionResponse(
        ok=True,
        message=message,
        has_reward=True,
        reward=reward,
        eval_output=result.output + (f"\n--- test log ---\n{log[-20_000:]}" if log else ""),
        tests=tests,
    )


async def _read_output(sandbox: Sandbox, path: str) -> bytes | None:
    """A file the evaluation wrote, or None when it cannot be read (it wrote none)."""
    try:
        return await sandbox.read_file(path)
    except (InvalidRequestError, OSError):
        return None


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
