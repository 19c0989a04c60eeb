"""The Environment Service: sandboxes behind the step API.

`ExecuteStep` runs a shell command in an environment's persistent shell;
`GetObservation` reports its state; `SubmitAction` performs structured actions (read,
write or edit a file, or submit — which copies the hidden files in and runs the
evaluation inside the sandbox).

Placement picks the backend (``local`` bubblewrap, ``docker``, or any registered in
`megaflow.env.registry`) and the mode:
``ephemeral`` environments get a fresh sandbox, stopped at release; ``persistent``
ones are reset to the image state at release and pooled for the next task (see
`megaflow.env.pool`). Both take a warm, never-used sandbox from the pool when one is
ready. `SuspendEnvironment` freezes a sandbox while its agent waits for the model;
the next call thaws it. `SnapshotEnvironment` saves the workspace to the artifact
store; `CreateEnvironmentRequest.restore_from` starts from such a snapshot.

A sandbox that dies under its task (killed from outside, its shell gone) is detected
on the next call, which raises `SandboxError` (retryable: the scheduler runs the task
elsewhere), and it is released. Leases, renewed by every call and heartbeat, are
reaped when they run out (`megaflow.env.leases`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from megaflow.contract.release import release_targets
from megaflow.core.errors import (
    CancelledTaskError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    SandboxError,
    ServiceUnavailableError,
)
from megaflow.env import backends
from megaflow.env.actions import check_relative_path, evaluate, file_action
from megaflow.env.artifacts import ArtifactStore
from megaflow.env.backends import MODES, SandboxFactory
from megaflow.env.config import EnvServiceConfig
from megaflow.env.leases import Environment, Reaper
from megaflow.env.pool import SandboxPool
from megaflow.env.repos import WorkspaceMaker
from megaflow.env.sandbox import CommandResult
from megaflow.v1 import common_pb2, env_pb2

__all__ = [
    "EnvServiceConfig",
    "SandboxEnvironmentService",
    "check_relative_path",
]

log = logging.getLogger(__name__)

MAX_FILES_BYTES = 32 * 1024 * 1024
_T = TypeVar("_T")


class SandboxEnvironmentService:
    """The Environment Service on this host: sandboxes of every registered backend
    (bubblewrap by default, Docker where configured, plug-ins)."""

    def __init__(self, config: EnvServiceConfig | None = None) -> None:
        self.config = config or EnvServiceConfig()
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.factory = SandboxFactory(self.config)
        self.pool = SandboxPool(self.config, self.factory, self._prefix)
        self.store = ArtifactStore(self.config.artifact_url or self.config.artifact_dir)
        self.workspaces = WorkspaceMaker.from_config(self.config)
        self._envs: dict[str, Environment] = {}
        self._creating = 0
        # owner -> its creates in flight; and the owners released while one was in flight
        # (that create is undone when it finishes: its caller gave up and never learns
        # the env id, so it must not wait for the lease reaper).
        self._creating_owners: dict[str, int] = {}
        self._released_owners: set[str] = set()
        self._none_creating = asyncio.Event()
        self._none_creating.set()
        self._closing = False
        self._ids = itertools.count()
        self._reaper = Reaper(
            self._envs,
            interval_s=self.config.reap_interval_s,
            idle_suspend_s=self.config.idle_suspend_s,
            release=self._destroy,
            suspend=self._suspend,
        )

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Reclaim what a dead earlier process left, start the reaper and the warm pools."""
        # Searchable, not listable: a local sandbox's unprivileged uid must pass to reach
        # its own folders (each 0700 and its own, on a nosuid tmpfs), so a setuid file an
        # agent plants in its workspace stays out of reach of other host users.
        self.config.root_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.config.root_dir.chmod(0o711)
        reclaimed = await self.factory.reclaim()
        if reclaimed:
            log.warning("reclaimed %d sandbox(es) left by an earlier process", reclaimed)
        self.pool.start()
        self._reaper.start()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new environments, wait for those starting, then release every one."""
        self._closing = True
        await self._none_creating.wait()
        await self._reaper.stop()
        await asyncio.gather(*(self._destroy(env_id) for env_id in list(self._envs)))
        await self.pool.stop()
        await self.factory.aclose()

    async def __aenter__(self) -> SandboxEnvironmentService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def warmed(self) -> None:
        """Wait until the warm pools' refills under way are done."""
        await self.pool.wait_refills()

    @property
    def live(self) -> int:
        """Sandboxes held: in use, starting, resetting and pooled (what the cap counts)."""
        return self.pool.slots

    def load(self) -> tuple[int, int]:
        """(busy, capacity) for heartbeats: busy = held sandboxes minus idle pooled ones
        (a pooled sandbox is free capacity, and the fastest kind)."""
        return self.pool.slots - self.pool.idle, self.config.max_environments

    # -- the contract ------------------------------------------------------------
    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        placement = request.placement if request.HasField("placement") else None
        spec = self.factory.spec(request.image, placement, request.limits)
        mode = (placement.mode if placement else "") or "ephemeral"
        if mode not in MODES:
            raise InvalidRequestError(f"unknown placement.mode {mode!r}; expected one of {MODES}")
        files = {check_relative_path(p): c for p, c in request.files.items()}
        hidden = {check_relative_path(p): c for p, c in request.hidden_files.items()}
        size = sum(map(len, files.values())) + sum(map(len, hidden.values()))
        if size > MAX_FILES_BYTES:
            raise InvalidRequestError(
                f"environment files total {size} bytes; limit {MAX_FILES_BYTES}"
            )
        if self._closing:
            raise ServiceUnavailableError("the Environment Service is shutting down")
        setup_s = request.setup_timeout_s or self.config.setup_timeout_s
        self._creating += 1  # stop() waits for this create, whatever it awaits
        self._none_creating.clear()
        owner = request.owner
        if owner:
            self._creating_owners[owner] = self._creating_owners.get(owner, 0) + 1
        try:
            archive = None
            if request.restore_from:
                archive = await self.store.read(request.restore_from)
            sandbox, _ = await self.pool.claim(spec, setup_s)
            try:
                async with asyncio.timeout(setup_s):
                    await self.workspaces.make(sandbox, request, setup_s)
                    await backends.put_files(sandbox, files)
                    await self.workspaces.setup(sandbox, request.setup_commands, setup_s)
                    if archive is not None:
                        await backends.restore(sandbox, archive)
            except BaseException as exc:
                await self.pool.give_back(spec, sandbox, reuse=False)
                if isinstance(exc, TimeoutError) and not isinstance(exc, DeadlineExceededError):
                    raise DeadlineExceededError(
                        f"environment setup passed its {setup_s:.1f}s budget"
                    ) from exc
                raise
            if owner in self._released_owners:
                await self.pool.give_back(spec, sandbox, reuse=False)
                raise CancelledTaskError(
                    f"owner {owner!r} released its environments while this one was created"
                )
        finally:
            self._creating -= 1
            if self._creating == 0:
                self._none_creating.set()
            if owner:
                left = self._creating_owners.pop(owner) - 1
                if left:
                    self._creating_owners[owner] = left
                else:
                    self._released_owners.discard(owner)
        env_id = f"env-{self._prefix}-{next(self._ids)}"
        lease_s = request.lease_s or self.config.lease_s
        self._envs[env_id] = Environment(
            env_id=env_id,
            owner=request.owner,
            spec=spec,
            sandbox=sandbox,
            persistent=mode == "persistent",
            hidden_files=hidden,
            eval_command=request.eval_command,
            lease_s=lease_s,
            lease_expires=time.monotonic() + lease_s,
        )
        return env_pb2.CreateEnvironmentResponse(
            env_id=env_id,
            workdir=backends.workdir(sandbox),
            host_socket_dir=backends.host_socket_dir(sandbox),
        )

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse:
        env = self._get(request.env_id)
        if not request.command.strip():
            raise InvalidRequestError("ExecuteStepRequest.command is empty")
        timeout_s = self._step_timeout(request.timeout_s)
        async with env.lock:
            await self._wake(env)
            result = await self._run(env, request.command, timeout_s)
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
            await self._wake(env)
            await self._check_alive(env)
            cwd = await self._guard(env, env.sandbox.cwd())
        return env_pb2.GetObservationResponse(
            cwd=cwd, last_output=env.last_output, steps=env.steps, alive=True
        )

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse:
        env = self._get(request.env_id)
        action = request.WhichOneof("action")
        if action is None:
            raise InvalidRequestError("SubmitActionRequest has no action")
        async with env.lock:
            await self._wake(env)
            await self._check_alive(env)
            env.steps += 1
            if action == "submit":
                timeout_s = request.submit.scoring_timeout_s or self.config.scoring_timeout_s
                return await self._guard(
                    env,
                    evaluate(
                        env.sandbox, env.env_id, env.hidden_files, env.eval_command, timeout_s
                    ),
                )
            try:
                return await self._guard(env, file_action(env.sandbox, request))
            except InvalidRequestError as error:  # the agent's mistake: tell it, keep going
                return env_pb2.SubmitActionResponse(ok=False, message=str(error))

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        env_ids = release_targets(request, self._envs)
        if request.owner in self._creating_owners:
            self._released_owners.add(request.owner)
        for env_id in env_ids:
            await self._destroy(env_id)
        return env_pb2.ReleaseEnvironmentResponse(released=len(env_ids))

    async def heartbeat(self, request: env_pb2.EnvHeartbeatRequest) -> env_pb2.EnvHeartbeatResponse:
        env = self._get(request.env_id)
        env.renew(request.lease_s or None)
        return env_pb2.EnvHeartbeatResponse(lease_expires_in_s=env.lease_expires - time.monotonic())

    async def snapshot_environment(
        self, request: env_pb2.SnapshotEnvironmentRequest
    ) -> env_pb2.SnapshotEnvironmentResponse:
        env = self._get(request.env_id)
        uri = self.store.check(request.uri or f"{env.env_id}-{uuid.uuid4().hex[:8]}.tar")
        async with env.lock:
            await self._wake(env)
            archive = await self._guard(env, backends.snapshot(env.sandbox))
        uri = await self.store.write(uri, archive)
        return env_pb2.SnapshotEnvironmentResponse(uri=uri, bytes=len(archive))

    async def suspend_environment(
        self, request: env_pb2.SuspendEnvironmentRequest
    ) -> env_pb2.SuspendEnvironmentResponse:
        env = self._get(request.env_id)
        async with env.lock:
            env.renew()
            await self._suspend(env)
        return env_pb2.SuspendEnvironmentResponse()

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        pool = self.pool
        return common_pb2.HealthResponse(
            ok=not self._closing,
            detail=(
                f"{self.live}/{self.config.max_environments} environments "
                f"({len(self._envs)} in use, {pool.starting} starting or resetting, "
                f"{pool.idle} pooled)"
            ),
        )

    # -- internals ---------------------------------------------------------------
    def _get(self, env_id: str) -> Environment:
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

    async def _wake(self, env: Environment) -> None:
        """Renew the lease and thaw a suspended sandbox (under the environment's lock)."""
        env.renew()
        if env.suspended:
            await self._guard(env, backends.resume(env.sandbox))
            env.suspended = False

    async def _suspend(self, env: Environment) -> None:
        if not env.suspended:
            await self._guard(env, backends.suspend(env.sandbox))
            env.suspended = True

    async def _check_alive(self, env: Environment) -> None:
        """Before a file action or an observation: SandboxError if the sandbox died since
        the last call. (A generous budget: a timed-out command would get the agent's
        background jobs killed, and a builtin `true` only waits for a busy machine.)"""
        await self._run(env, "true", self.config.step_timeout_s)

    async def _run(self, env: Environment, command: str, timeout_s: float) -> CommandResult:
        """Run a command; SandboxError (and release) if the sandbox had died before it."""
        result = await self._guard(env, env.sandbox.execute(command, timeout_s))
        if backends.shell_died_between_calls(result.output) or not env.sandbox.alive:
            await self._destroy(env.env_id, broken=True)
            sandbox_id = env.sandbox.sandbox_id
            log.warning("sandbox %s of %s died between calls; released it", sandbox_id, env.env_id)
            raise SandboxError(f"the sandbox of {env.env_id} died between calls; its state is lost")
        return result

    async def _guard(self, env: Environment, call: Awaitable[_T]) -> _T:
        """Await a sandbox call; a SandboxError means the sandbox is gone: release it."""
        try:
            return await call
        except SandboxError as exc:
            log.warning("sandbox of %s failed (%s); releasing it", env.env_id, exc)
            await self._destroy(env.env_id, broken=True)
            raise

    async def _destroy(self, env_id: str, *, broken: bool = False) -> None:
        """Hand an environment's sandbox back to the pool: reset and kept (persistent
        mode), or stopped (ephemeral mode, or ``broken``: it failed under its task)."""
        env = self._envs.pop(env_id, None)
        if env is None:
            return
        if env.suspended:
            try:
                await backends.resume(env.sandbox)
                env.suspended = False
            except Exception as exc:
                log.warning("cannot resume %s before release: %s", env_id, exc)
        reuse = env.persistent and not env.suspended and not broken
        await self.pool.give_back(env.spec, env.sandbox, reuse=reuse)
