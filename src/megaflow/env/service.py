"""The Environment Service: sandboxes behind the step API.

`ExecuteStep` runs a shell command in an environment's persistent shell;
`GetObservation` reports its state; `SubmitAction` performs structured actions (read,
write or edit a file, or submit — which copies the hidden files in and runs the
evaluation inside the sandbox). Every environment holds a lease renewed by steps and
heartbeats; a background reaper releases environments whose lease expired, so an
agent that vanished cannot leak a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import (
    CapacityError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    SandboxError,
    ServiceUnavailableError,
)
from megaflow.env.local import LocalSandbox, reclaim_orphans
from megaflow.v1 import common_pb2, env_pb2

log = logging.getLogger(__name__)

MAX_FILES_BYTES = 32 * 1024 * 1024


class EnvServiceConfig(BaseModel):
    """Settings of one Environment Service (local bubblewrap backend)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root_dir: Path = Field(
        default=Path("/tmp/megaflow/sandboxes"),
        description="Host directory holding each sandbox's workspace and state.",
    )
    max_environments: int = Field(default=512, ge=1, description="Hard cap on live sandboxes.")
    memory_mib: int = Field(default=1024, ge=16, description="Default memory limit per sandbox.")
    pids: int = Field(default=256, ge=8, description="Default process-count limit per sandbox.")
    output_bytes: int = Field(default=64_000, ge=1024, description="Default cap on step output.")
    step_timeout_s: float = Field(default=60.0, gt=0, description="Default per-command budget.")
    max_step_timeout_s: float = Field(default=3600.0, gt=0, description="Largest budget allowed.")
    setup_timeout_s: float = Field(default=60.0, gt=0, description="Default sandbox setup budget.")
    scoring_timeout_s: float = Field(default=120.0, gt=0, description="Default evaluation budget.")
    lease_s: float = Field(default=900.0, gt=0, description="Default lease; renewed by each call.")
    reap_interval_s: float = Field(
        default=5.0, gt=0, description="How often expired leases are reaped."
    )


@dataclass
class _Environment:
    env_id: str
    owner: str
    sandbox: LocalSandbox
    hidden_files: dict[str, bytes]
    eval_command: str
    lease_s: float
    lease_expires: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    steps: int = 0
    last_output: str = ""

    def renew(self, lease_s: float | None = None) -> None:
        if lease_s:
            self.lease_s = lease_s
        self.lease_expires = time.monotonic() + self.lease_s


def check_relative_path(path: str) -> str:
    """A workspace-relative path, or InvalidRequestError."""
    if not path or "\x00" in path:
        raise InvalidRequestError(f"invalid file path {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise InvalidRequestError(f"file path {path!r} must stay inside the workspace")
    return norm


class LocalEnvironmentService:
    """The Environment Service over local bubblewrap sandboxes."""

    def __init__(self, config: EnvServiceConfig | None = None) -> None:
        self.config = config or EnvServiceConfig()
        self._envs: dict[str, _Environment] = {}
        self._starting = 0  # sandboxes still starting count against the cap
        self._none_starting = asyncio.Event()
        self._none_starting.set()
        self._closing = False
        self._teardowns: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self.config.root_dir.mkdir(parents=True, exist_ok=True)
        reclaimed = await asyncio.to_thread(reclaim_orphans, self.config.root_dir)
        if reclaimed:
            log.warning("reclaimed %d sandbox(es) left by an earlier process", reclaimed)
        self._reaper = asyncio.create_task(self._reap_forever(), name="env-lease-reaper")

    async def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new environments, wait for those starting, then release every one."""
        self._closing = True
        await self._none_starting.wait()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await asyncio.gather(*(self._destroy(env_id) for env_id in list(self._envs)))
        await asyncio.gather(*self._teardowns, return_exceptions=True)

    async def __aenter__(self) -> LocalEnvironmentService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def live(self) -> int:
        return len(self._envs) + self._starting

    # -- the contract ------------------------------------------------------------
    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        if request.image not in ("", "host"):
            raise InvalidRequestError(
                f"image {request.image!r} is not available: the local backend serves 'host'"
            )
        files = {check_relative_path(p): c for p, c in request.files.items()}
        hidden = {check_relative_path(p): c for p, c in request.hidden_files.items()}
        size = sum(map(len, files.values())) + sum(map(len, hidden.values()))
        if size > MAX_FILES_BYTES:
            raise InvalidRequestError(
                f"environment files total {size} bytes; limit {MAX_FILES_BYTES}"
            )
        if self._closing:
            raise ServiceUnavailableError("the Environment Service is shutting down")
        if self.live >= self.config.max_environments:
            raise CapacityError(f"all {self.config.max_environments} environment slots are in use")
        cfg, limits = self.config, request.limits
        env_id = f"env-{self._prefix}-{next(self._ids)}"
        sandbox = LocalSandbox(
            env_id,
            root_dir=cfg.root_dir,
            memory_mib=limits.memory_mib or cfg.memory_mib,
            pids=limits.pids or cfg.pids,
            output_bytes=limits.output_bytes or cfg.output_bytes,
        )
        self._starting += 1
        self._none_starting.clear()
        try:
            setup_s = request.setup_timeout_s or cfg.setup_timeout_s
            try:
                async with asyncio.timeout(setup_s):
                    await sandbox.start(timeout_s=setup_s)
                    await asyncio.to_thread(_write_files, sandbox.host_workspace, files)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"sandbox setup passed its {setup_s:.1f}s budget"
                ) from None
        except BaseException:
            await self._teardown(sandbox)
            raise
        finally:
            self._starting -= 1
            if self._starting == 0:
                self._none_starting.set()
        lease_s = request.lease_s or cfg.lease_s
        self._envs[env_id] = _Environment(
            env_id=env_id,
            owner=request.owner,
            sandbox=sandbox,
            hidden_files=hidden,
            eval_command=request.eval_command,
            lease_s=lease_s,
            lease_expires=time.monotonic() + lease_s,
        )
        return env_pb2.CreateEnvironmentResponse(env_id=env_id, workdir=LocalSandbox.WORKDIR)

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse:
        env = self._get(request.env_id)
        if not request.command.strip():
            raise InvalidRequestError("ExecuteStepRequest.command is empty")
        timeout_s = self._step_timeout(request.timeout_s)
        async with env.lock:
            env.renew()
            result = await env.sandbox.execute(request.command, timeout_s)
            env.steps += 1
            env.last_output = result.output
        return env_pb2.ExecuteStepResponse(
            output=result.output,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            truncated=result.truncated,
            duration_s=result.duration_s,
        )

    async def get_observation(
        self, request: env_pb2.GetObservationRequest
    ) -> env_pb2.GetObservationResponse:
        env = self._get(request.env_id)
        async with env.lock:
            env.renew()
            alive = env.sandbox.alive
            cwd = await env.sandbox.cwd() if alive else ""
        return env_pb2.GetObservationResponse(
            cwd=cwd, last_output=env.last_output, steps=env.steps, alive=alive
        )

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse:
        env = self._get(request.env_id)
        action = request.WhichOneof("action")
        if action is None:
            raise InvalidRequestError("SubmitActionRequest has no action")
        async with env.lock:
            env.renew()
            env.steps += 1
            if action == "submit":
                return await self._evaluate(env, request.submit.scoring_timeout_s)
            try:
                return await _file_action(env.sandbox, request)
            except InvalidRequestError as error:  # the agent's mistake: tell it, keep going
                return env_pb2.SubmitActionResponse(ok=False, message=str(error))

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        if request.env_id not in self._envs:
            raise NotFoundError(f"no environment {request.env_id!r}")
        await self._destroy(request.env_id)
        return env_pb2.ReleaseEnvironmentResponse()

    async def heartbeat(self, request: env_pb2.EnvHeartbeatRequest) -> env_pb2.EnvHeartbeatResponse:
        env = self._get(request.env_id)
        env.renew(request.lease_s or None)
        return env_pb2.EnvHeartbeatResponse(lease_expires_in_s=env.lease_expires - time.monotonic())

    async def snapshot_environment(
        self, request: env_pb2.SnapshotEnvironmentRequest
    ) -> env_pb2.SnapshotEnvironmentResponse:
        self._get(request.env_id)
        raise InvalidRequestError("snapshots are not supported by this Environment Service yet")

    async def suspend_environment(
        self, request: env_pb2.SuspendEnvironmentRequest
    ) -> env_pb2.SuspendEnvironmentResponse:
        self._get(request.env_id)
        raise InvalidRequestError("suspend is not supported by this Environment Service yet")

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(
            ok=True, detail=f"{self.live}/{self.config.max_environments} environments"
        )

    # -- internals ---------------------------------------------------------------
    def _get(self, env_id: str) -> _Environment:
        env = self._envs.get(env_id)
        if env is None:
            raise NotFoundError(f"no environment {env_id!r} (released, expired or never created)")
        return env

    def _step_timeout(self, requested: float) -> float:
        if requested < 0:
            raise InvalidRequestError("timeout_s must be >= 0")
        timeout_s = requested or self.config.step_timeout_s
        if timeout_s > self.config.max_step_timeout_s:
            raise InvalidRequestError(
                f"timeout_s {timeout_s} exceeds the limit {self.config.max_step_timeout_s}"
            )
        return timeout_s

    async def _evaluate(
        self, env: _Environment, scoring_timeout_s: float
    ) -> env_pb2.SubmitActionResponse:
        if not env.eval_command:
            return env_pb2.SubmitActionResponse(
                ok=True, message="submitted; no evaluation configured"
            )
        timeout_s = scoring_timeout_s or self.config.scoring_timeout_s
        if not env.sandbox.alive:
            raise SandboxError(f"sandbox of {env.env_id} died before scoring")
        for path, content in env.hidden_files.items():
            await env.sandbox.write_file(path, content)
        # Score from the workspace root, whatever directory the agent left the shell in.
        result = await env.sandbox.execute(
            f"cd {LocalSandbox.WORKDIR} && {env.eval_command}", timeout_s
        )
        passed = result.exit_code == 0 and not result.timed_out
        return env_pb2.SubmitActionResponse(
            ok=True,
            message="hidden tests passed" if passed else "hidden tests failed",
            has_reward=True,
            reward=1.0 if passed else 0.0,
            eval_output=result.output,
        )

    async def _destroy(self, env_id: str) -> None:
        """Tear a sandbox down. The teardown runs to completion even if the caller is
        cancelled half-way (stop() waits for it), so nothing is left half-removed."""
        env = self._envs.pop(env_id, None)
        if env is None:
            return
        await self._teardown(env.sandbox)

    async def _teardown(self, sandbox: LocalSandbox) -> None:
        teardown = asyncio.create_task(sandbox.stop(), name="sandbox-teardown")
        self._teardowns.add(teardown)
        teardown.add_done_callback(self._teardowns.discard)
        await asyncio.shield(teardown)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            now = time.monotonic()
            for env in [e for e in self._envs.values() if e.lease_expires < now]:
                log.warning("lease of %s (owner %s) expired; releasing it", env.env_id, env.owner)
                await self._destroy(env.env_id)


def _write_files(workspace: Path, files: dict[str, bytes]) -> None:
    """Write a task's repository into a fresh, empty workspace (no agent has touched it)."""
    for rel, content in files.items():
        target = workspace / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


async def _file_action(
    sandbox: LocalSandbox, request: env_pb2.SubmitActionRequest
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
