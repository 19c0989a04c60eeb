"""`SimulatedEnvironmentService`: an in-package fake of the Environment Service.

For benchmarks of the orchestrator (and tests that must not pay for sandboxes): it
starts no process and runs no command. Each environment is an in-memory copy of the
task's files; `ExecuteStep` waits a configured latency and answers the few commands
the simulated policy uses (`cat`, `ls`, `grep -rn`, the test runner, `echo`,
`true`); file actions edit the in-memory files; `submit` scores them with
`megaflow.tasks.scoring.simulated_reward`. It honours the contract: capacity cap,
unknown ids, malformed requests, leases are not modelled. A request's `workspace` (a
repository by reference) and `setup_commands` are accepted and ignored: only `files`
exist in memory, and no command runs.

Warm pools are modelled per image (`warm_pool`): a create whose image has an idle warm
sandbox claims it (`warm_claim_latency_s`, counted in `warm_hits`); any other create is
cold (`create_latency_s`, counted in `cold_creates`). A claimed warm sandbox is replaced
`refill_latency_s` after its environment is released.
"""

from __future__ import annotations

import asyncio
import itertools
import posixpath
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from megaflow.contract.release import release_targets
from megaflow.core.errors import CapacityError, InvalidRequestError, NotFoundError
from megaflow.core.shell import split_words
from megaflow.tasks.scoring import simulated_reward
from megaflow.v1 import common_pb2, env_pb2, scheduler_pb2

WORKDIR = "/workspace"


class SimulatedEnvConfig(BaseModel):
    """Latencies of the simulated environment (seconds; 0 = answer at once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    create_latency_s: float = Field(default=0.0, ge=0, description="Time to create an environment.")
    step_latency_s: float = Field(default=0.0, ge=0, description="Time of every ExecuteStep.")
    scoring_latency_s: float = Field(
        default=0.0, ge=0, description="Time of the evaluation on submit."
    )
    max_environments: int = Field(
        default=1_000_000, ge=1, description="Hard cap on live environments."
    )
    warm_pool: dict[str, int] = Field(
        default_factory=dict, description="Image -> number of warm sandboxes kept idle for it."
    )
    warm_claim_latency_s: float = Field(
        default=0.0, ge=0, description="Time to claim a warm sandbox (a warm-pool hit)."
    )
    refill_latency_s: float = Field(
        default=0.0, ge=0, description="Time after a release until its warm slot is idle again."
    )


@dataclass
class _Env:
    files: dict[str, bytes]
    hidden: dict[str, bytes]
    steps: int = 0
    last_output: str = ""
    warm_image: str | None = None  # the warm pool it was claimed from, refilled on release
    owner: str = ""


class SimulatedEnvironmentService:
    """The `EnvironmentService` contract over in-memory repositories."""

    def __init__(self, config: SimulatedEnvConfig | None = None) -> None:
        self.config = config or SimulatedEnvConfig()
        self._envs: dict[str, _Env] = {}
        self._ids = itertools.count()
        self.created = 0
        self.warm_hits = 0
        self.cold_creates = 0
        self._idle_warm = dict(self.config.warm_pool)
        self._refills: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 0.0) -> None:
        for handle in self._refills:
            handle.cancel()
        self._refills.clear()
        self._envs.clear()

    def advertised(self) -> scheduler_pb2.HostResources:
        """What this host offers the scheduler: its warm pools."""
        return scheduler_pb2.HostResources(warm_images=self.config.warm_pool)

    def idle_warm(self, image: str) -> int:
        return self._idle_warm.get(image, 0)

    @property
    def live(self) -> int:
        return len(self._envs)

    async def _wait(self, seconds: float) -> None:
        if seconds:
            await asyncio.sleep(seconds)

    def _get(self, env_id: str) -> _Env:
        env = self._envs.get(env_id)
        if env is None:
            raise NotFoundError(f"no environment {env_id!r}")
        return env

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        if len(self._envs) >= self.config.max_environments:
            raise CapacityError(f"all {self.config.max_environments} environments are in use")
        env_id = f"sim-{next(self._ids)}"
        env = _Env(dict(request.files), dict(request.hidden_files), owner=request.owner)
        self._envs[env_id] = env
        self.created += 1
        if self._idle_warm.get(request.image, 0) > 0:
            self._idle_warm[request.image] -= 1
            env.warm_image = request.image
            self.warm_hits += 1
            await self._wait(self.config.warm_claim_latency_s)
        else:
            self.cold_creates += 1
            await self._wait(self.config.create_latency_s)
        return env_pb2.CreateEnvironmentResponse(env_id=env_id, workdir=WORKDIR)

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse:
        env = self._get(request.env_id)
        if not request.command.strip():
            raise InvalidRequestError("ExecuteStepRequest.command is empty")
        await self._wait(self.config.step_latency_s)
        output, code = _run(env, request.command)
        env.steps += 1
        env.last_output = output
        return env_pb2.ExecuteStepResponse(output=output, exit_code=code)

    async def get_observation(
        self, request: env_pb2.GetObservationRequest
    ) -> env_pb2.GetObservationResponse:
        env = self._get(request.env_id)
        return env_pb2.GetObservationResponse(
            cwd=WORKDIR, last_output=env.last_output, steps=env.steps, alive=True
        )

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse:
        env = self._get(request.env_id)
        env.steps += 1
        action = request.WhichOneof("action")
        if action == "submit":
            await self._wait(self.config.scoring_latency_s)
            reward = simulated_reward(env.files, env.hidden)
            return env_pb2.SubmitActionResponse(
                ok=True, message="simulated evaluation", has_reward=True, reward=reward
            )
        if action == "read_file":
            content = env.files.get(_rel(request.read_file.path))
            if content is None:
                return env_pb2.SubmitActionResponse(ok=False, message="no such file")
            return env_pb2.SubmitActionResponse(ok=True, content=content)
        if action == "write_file":
            env.files[_rel(request.write_file.path)] = request.write_file.content
            return env_pb2.SubmitActionResponse(ok=True, message="written")
        if action == "edit_file":
            edit = request.edit_file
            path = _rel(edit.path)
            text = env.files.get(path, b"").decode(errors="replace")
            count = text.count(edit.old) if edit.old else 0
            if count != 1:
                where = "not found" if count == 0 else f"found {count} times"
                return env_pb2.SubmitActionResponse(ok=False, message=f"edit_file: text {where}")
            env.files[path] = text.replace(edit.old, edit.new, 1).encode()
            return env_pb2.SubmitActionResponse(ok=True, message=f"edited {path}")
        raise InvalidRequestError("SubmitActionRequest has no action")

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        env_ids = release_targets(request, self._envs)
        for env_id in env_ids:
            env = self._envs.pop(env_id)
            if env.warm_image is not None:
                self._refill_later(env.warm_image)
        return env_pb2.ReleaseEnvironmentResponse(released=len(env_ids))

    def _refill(self, image: str) -> None:
        self._idle_warm[image] += 1

    def _refill_later(self, image: str) -> None:
        if not self.config.refill_latency_s:
            self._refill(image)
            return
        loop = asyncio.get_running_loop()

        def done() -> None:
            self._refills.discard(handle)
            self._refill(image)

        handle = loop.call_later(self.config.refill_latency_s, done)
        self._refills.add(handle)

    async def heartbeat(self, request: env_pb2.EnvHeartbeatRequest) -> env_pb2.EnvHeartbeatResponse:
        self._get(request.env_id)
        return env_pb2.EnvHeartbeatResponse(lease_expires_in_s=float("inf"))

    async def snapshot_environment(
        self, request: env_pb2.SnapshotEnvironmentRequest
    ) -> env_pb2.SnapshotEnvironmentResponse:
        raise InvalidRequestError("the simulated environment keeps no snapshots")

    async def suspend_environment(
        self, request: env_pb2.SuspendEnvironmentRequest
    ) -> env_pb2.SuspendEnvironmentResponse:
        self._get(request.env_id)
        return env_pb2.SuspendEnvironmentResponse()

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(ok=True, detail=f"{self.live} simulated environments")


def _rel(path: str) -> str:
    norm = posixpath.normpath(path)
    return norm.removeprefix(WORKDIR + "/").lstrip("/")


def _run(env: _Env, command: str) -> tuple[str, int]:
    """Answer the commands the simulated policy uses; anything else succeeds silently."""
    try:
        argv = split_words(command)
    except ValueError:
        return "simulated shell: cannot parse the command\n", 2
    if not argv:
        return "", 0
    name = argv[0]
    if name == "cat":
        out = []
        for arg in argv[1:]:
            content = env.files.get(_rel(arg))
            if content is None:
                return f"cat: {arg}: No such file or directory\n", 1
            out.append(content.decode(errors="replace"))
        return "".join(out), 0
    if name == "ls":
        return "\n".join(sorted(env.files)) + "\n", 0
    if name == "grep":
        pattern = next((a for a in argv[1:] if not a.startswith("-")), "")
        hits = [
            f"{path}:{n}:{line}"
            for path, content in sorted(env.files.items())
            for n, line in enumerate(content.decode(errors="replace").splitlines(), 1)
            if pattern and pattern in line
        ]
        return ("\n".join(hits) + "\n") if hits else "", 0 if hits else 1
    if name.startswith("python"):
        return "----------------------------------------------------------------------\nOK\n", 0
    if name == "echo":
        return " ".join(argv[1:]) + "\n", 0
    return "", 0
