"""What both systems share: the simulated GPU, the environment, the faults, the node.

Every figure here is an assumption of the comparison; `docs/baseline.md` lists them
with their sources. Simulated times are *modelled* seconds: the run stretches them by
`time_scale` (wall seconds per modelled second) so that one 2-core machine can drive
thousands of tasks, and the report divides measured wall times by it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
import time
from array import array
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megaflow.core.errors import SandboxError
from megaflow.model.latency import GpuLatencyModel, LatencyConfig, Served
from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.v1 import env_pb2

MIB = 1024 * 1024
GIB = 1024 * MIB

Mechanism = Literal["docker_exec", "swerex", "none"]
"""How the monolith reaches its sandbox for each command (see `Scenario.monolith_path`)."""
MECHANISMS: tuple[Mechanism, ...] = ("docker_exec", "swerex", "none")
LABELS: dict[Mechanism, str] = {
    "docker_exec": "docker exec",
    "swerex": "SWE-ReX",
    "none": "no exec cost",
}


class EnvPath(BaseModel):
    """What one system pays, besides the command's own work, to reach its sandbox:
    once per task (getting a sandbox) and once per environment operation (a command,
    an edit, the evaluation). Measured figures; `*_cpu` is the share of that time that
    holds one of the node's cores (the rest is waiting)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="What the path is, for the report.")
    create_s: float = Field(ge=0, description="Seconds to get a sandbox, per task.")
    create_cpu: float = Field(ge=0, le=1, description="Share of `create_s` holding a core.")
    op_s: float = Field(ge=0, description="Seconds per environment operation (mechanism).")
    op_cpu: float = Field(ge=0, le=1, description="Share of `op_s` holding a core.")


class Scenario(BaseModel):
    """The shared set-up of one comparison run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(default=0, description="Seed of the tasks, the latency jitter and faults.")
    time_scale: float = Field(
        default=5.0, gt=0, description="Wall seconds per modelled second (both systems)."
    )
    waves: int = Field(
        default=3, ge=2, description="Tasks per level = waves x concurrency (steady state)."
    )
    success_rate: float = Field(default=0.8, description="Simulated policy's solve rate.")
    # -- the simulated GPU (identical for both systems) -----------------------------------
    replicas: int = Field(default=8, ge=1, description="GPUs, one inference replica each.")
    slots_per_replica: int = Field(
        default=128, ge=1, description="Continuous-batching slots per GPU (max_num_seqs)."
    )
    prefill_s_per_token: float = Field(default=0.0002, description="Prefill s/uncached token.")
    decode_s_per_token: float = Field(default=0.004, description="Decode s/token, batch of 1.")
    model_overhead_s: float = Field(default=0.02, description="Fixed seconds per request.")
    decode_batch_slowdown: float = Field(
        default=0.5, description="Decode is this much slower with a full batch (linear)."
    )
    prefix_cache_tokens: int = Field(
        default=4_000_000, description="Prefix-cache tokens per GPU (keyed by task)."
    )
    context_scale: float = Field(
        default=1.0,
        gt=0,
        description="The GPU sees each prompt as this many times its tokens (the synthetic "
        "tasks' contexts are a few hundred tokens; real agents' are longer): the workload "
        "frontier varies it, the headline keeps 1.",
    )
    model_jitter: float = Field(
        default=0.25,
        ge=0,
        lt=1,
        description="The latency model's jitter (seeded per replica; both systems).",
    )
    # -- the simulated environment: the commands' own work (identical for both) -----------
    step_s: float = Field(default=0.3, description="Mean `bash` step time (the command).")
    edit_s: float = Field(default=0.02, description="Mean file-edit time.")
    scoring_s: float = Field(default=0.5, description="Mean evaluation time on submit.")
    jitter_sigma: float = Field(
        default=0.6, ge=0, description="Log-normal sigma of every environment time (mean kept)."
    )
    fault_rate: float = Field(
        default=0.01, ge=0, le=1, description="P(SandboxError) per create and per step."
    )
    # -- how each system reaches its sandboxes: measured on this machine ------------------
    monolith_exec: Mechanism = Field(
        default="docker_exec",
        description="The monolith's per-command path in the headline (the report runs all).",
    )
    monolith_variants: tuple[Mechanism, ...] = Field(
        default=MECHANISMS,
        description="Per-command paths the monolith ramps with (the sensitivity); run at "
        "the same time, each level, in this process.",
    )
    docker_run_s: float = Field(
        default=0.193,
        description="Monolith's sandbox per task: `docker run --rm --network none` p50 "
        "(docs/benchmarks.md, Docker; includes the removal).",
    )
    docker_run_cpu: float = Field(
        default=0.67,
        ge=0,
        le=1,
        description="Share of `docker run` holding a core (exec_cost: CPU 128 of 191 ms).",
    )
    docker_exec_s: float = Field(
        default=0.0515,
        description="`docker exec CONTAINER echo hi` p50 (docs/benchmarks.md, Docker).",
    )
    docker_exec_cpu: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of `docker exec` holding a core (exec_cost: CPU 73 ms per 53 ms, "
        "more than one core; capped at one).",
    )
    swerex_step_s: float = Field(
        default=0.1157,
        description="SWE-ReX `LocalRuntime` `echo` p50 (docs/benchmarks.md, Environments).",
    )
    swerex_cpu: float = Field(
        default=0.07,
        ge=0,
        le=1,
        description="Share of a SWE-ReX step holding a core (exec_cost: CPU 8 of 111 ms).",
    )
    megaflow_claim_s: float = Field(
        default=0.00139,
        description="MegaFlow's sandbox per task: warm-pool claim over gRPC p50 "
        "(docs/benchmarks.md, Environments).",
    )
    megaflow_step_s: float = Field(
        default=0.00051,
        description="MegaFlow's `ExecuteStep` `echo` over gRPC loopback p50 "
        "(docs/benchmarks.md, Environments; persistent shell).",
    )
    # -- the node the monolith runs on (and its resource model) ---------------------------
    node_cores: int = Field(default=112, description="CPU cores of the GPU node.")
    inference_cores: int = Field(default=8, description="Cores the inference servers keep.")
    node_memory_gib: float = Field(default=2048.0, description="Host memory of the GPU node.")
    reserved_memory_fraction: float = Field(
        default=0.1, description="Host memory kept for the OS and the inference servers."
    )
    worker_mib: float = Field(default=43.0, description="One monolith worker process.")
    sandbox_mib: float = Field(default=1.2, description="One idle sandbox.")
    env_cpu_fraction: float = Field(
        default=1.0, ge=0, le=1, description="Share of an environment op that needs a core."
    )
    # -- what "sustainable" means (the same for both) -------------------------------------
    sla_p99_step_s: float = Field(default=2.5, description="p99 step latency SLA, modelled s.")
    min_growth: float = Field(
        default=0.1, description="Throughput must grow this much over the previous level."
    )
    baseline_levels: tuple[int, ...] = Field(
        default=(64, 128, 192, 256, 384), description="Monolith workers ramp."
    )
    megaflow_levels: tuple[int, ...] = Field(
        default=(512, 1536, 3072, 4608, 6144), description="MegaFlow concurrency ramp."
    )

    def variants(self) -> tuple[Mechanism, ...]:
        """The monolith's variants to run, the headline's first."""
        rest = [m for m in self.monolith_variants if m != self.monolith_exec]
        return (self.monolith_exec, *rest)

    def monolith_name(self, mechanism: Mechanism) -> str:
        if mechanism == self.monolith_exec:
            return "monolith"
        return f"monolith ({LABELS[mechanism]})"

    def monolith_path(self, mechanism: Mechanism | None = None) -> EnvPath:
        """The monolith's path: a fresh container per task (`docker run`), then each
        operation through `mechanism` (default: the headline's)."""
        mech = mechanism or self.monolith_exec
        op_s, op_cpu = {
            "docker_exec": (self.docker_exec_s, self.docker_exec_cpu),
            "swerex": (self.swerex_step_s, self.swerex_cpu),
            "none": (0.0, 0.0),
        }[mech]
        return EnvPath(
            name=LABELS[mech],
            create_s=self.docker_run_s,
            create_cpu=self.docker_run_cpu,
            op_s=op_s,
            op_cpu=op_cpu,
        )

    def megaflow_path(self) -> EnvPath:
        """MegaFlow's path: a warm-pool claim per task, `ExecuteStep` over gRPC per
        operation (on its own environment hosts: the CPU shares do not matter there)."""
        return EnvPath(
            name="MegaFlow ExecuteStep (gRPC)",
            create_s=self.megaflow_claim_s,
            create_cpu=1.0,
            op_s=self.megaflow_step_s,
            op_cpu=1.0,
        )

    def latency_config(self, replica: int = 0) -> LatencyConfig:
        return LatencyConfig(
            slots=self.slots_per_replica,
            prefill_s_per_token=self.prefill_s_per_token,
            decode_s_per_token=self.decode_s_per_token,
            overhead_s=self.model_overhead_s,
            time_scale=self.time_scale,
            decode_batch_slowdown=self.decode_batch_slowdown,
            prefix_cache_tokens=self.prefix_cache_tokens,
            jitter=self.model_jitter,
            seed=self.seed * 1000 + replica,
        )

    @property
    def gpu_slots(self) -> int:
        return self.replicas * self.slots_per_replica

    @property
    def env_cores(self) -> int:
        """Cores left on the GPU node for the monolith's environment operations."""
        return max(self.node_cores - self.inference_cores, 1)

    def shrunk(self, k: int) -> Scenario:
        """The same scenario on 1/k of the hardware: as many replicas (so round-robin
        misses as often), 1/k of the slots, of the node's cores and of its memory."""
        if k < 1 or self.slots_per_replica % k or self.env_cores % k:
            raise ValueError(
                f"shrink factor must be >= 1 and divide the slots per replica "
                f"({self.slots_per_replica}) and the sandbox cores ({self.env_cores}), got {k}"
            )
        inference = max(1, self.inference_cores // k)
        return self.model_copy(
            update={
                "slots_per_replica": self.slots_per_replica // k,
                "inference_cores": inference,
                "node_cores": inference + self.env_cores // k,
                "node_memory_gib": self.node_memory_gib / k,
            }
        )

    def memory_cap(self, per_task_mib: float) -> int:
        """How many tasks of `per_task_mib` the node's usable memory holds."""
        usable = self.node_memory_gib * 1024 * (1 - self.reserved_memory_fraction)
        return int(usable // per_task_mib)


class Frontier(BaseModel):
    """The workload frontier: the comparison again, on `1/fraction` of the hardware
    (`Scenario.shrunk`), for each context scale; only the headline's monolith."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: int = Field(default=8, ge=1, description="Run on 1/fraction of the hardware.")
    context_scales: tuple[float, ...] = Field(
        default=(1.0, 3.0, 10.0), min_length=1, description="Context scales to run."
    )
    time_scale: float = Field(
        default=1.0, gt=0, description="Wall s per modelled s (fewer tasks: less stretch)."
    )
    baseline_levels: tuple[int, ...] = Field(
        default=(8, 12, 18, 27, 40, 60, 90, 135, 203), description="Monolith workers ramp."
    )
    megaflow_levels: tuple[int, ...] = Field(
        default=(48, 72, 108, 162, 243, 364, 546, 819, 1229),
        description="MegaFlow concurrency ramp (steps of 1.5x, like the monolith's).",
    )

    @field_validator("context_scales")
    @classmethod
    def _distinct(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 for x in scales) or len({f"{x:g}" for x in scales}) != len(scales):
            raise ValueError(f"context scales must be positive and distinct, got {scales}")
        return scales

    @classmethod
    def matching(cls, sc: Scenario, context_scales: tuple[float, ...]) -> Frontier:
        """A frontier on `sc`'s own hardware, time scale and ramps (small runs, tests)."""
        return cls(
            fraction=1,
            context_scales=context_scales,
            time_scale=sc.time_scale,
            baseline_levels=sc.baseline_levels,
            megaflow_levels=sc.megaflow_levels,
        )

    def scenario(self, sc: Scenario, context_scale: float) -> Scenario:
        """`sc` shrunk, at `context_scale`, with this frontier's ramps and time scale."""
        return sc.shrunk(self.fraction).model_copy(
            update={
                "context_scale": context_scale,
                "time_scale": self.time_scale,
                "baseline_levels": self.baseline_levels,
                "megaflow_levels": self.megaflow_levels,
                "monolith_variants": (sc.monolith_exec,),
            }
        )


QUICK = Scenario(
    time_scale=0.5,
    replicas=2,
    slots_per_replica=16,
    node_cores=10,
    inference_cores=2,
    baseline_levels=(4, 8, 16, 32),
    megaflow_levels=(16, 64, 96),
)
QUICK_FRONTIER = Frontier.matching(QUICK, (1.0, 10.0))


def unit(*parts: object) -> float:
    """A uniform draw in (0, 1), a pure function of `parts`."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2**64


def lognormal(mean: float, sigma: float, u: float) -> float:
    """The log-normal quantile at `u` with this mean and log-sigma."""
    if mean <= 0 or sigma == 0:
        return mean
    mu = math.log(mean) - sigma * sigma / 2
    return math.exp(mu + sigma * statistics.NormalDist().inv_cdf(u))


class MeteredGpu(GpuLatencyModel):
    """A `GpuLatencyModel` that also keeps each request's service interval, so that
    throughput and busy slot-time can be read over any window, not only since start.
    It sees every prompt as `context_scale` times its tokens (completions as they are):
    a turn of the synthetic tasks stands for a turn of an agent with a longer context."""

    def __init__(self, config: LatencyConfig, context_scale: float = 1.0) -> None:
        super().__init__(config)
        self.context_scale = context_scale
        self.starts = array("d")
        self.ends = array("d")
        self.prompt_tokens = 0  # as seen (scaled), all requests
        self.calls = 0
        self._completion_extra: dict[str, int] = {}  # per prefix key, for `_remember`

    def _remember(self, key: str | None, tokens: int) -> None:
        """Cache the prefix as the next prompt will see it: the scaled prompt and the
        scaled completion (decoding costs the completion's own tokens)."""
        extra = self._completion_extra.pop(key, 0) if key is not None else 0
        super()._remember(key, tokens + extra)

    async def serve(
        self, prompt_tokens: int, completion_tokens: int, prefix_key: str | None = None
    ) -> Served:  # `run` calls it too
        prompt_tokens = round(prompt_tokens * self.context_scale)
        self.prompt_tokens += prompt_tokens
        self.calls += 1
        if prefix_key is not None:  # the completion joins the next prompt, scaled
            scaled = round(completion_tokens * self.context_scale)
            self._completion_extra[prefix_key] = scaled - completion_tokens
        served = await super().serve(prompt_tokens, completion_tokens, prefix_key)
        end = time.monotonic()
        self.starts.append(end - served.service_s)
        self.ends.append(end)
        return served

    def completed_between(self, t0: float, t1: float) -> int:
        return sum(1 for e in self.ends if t0 <= e < t1)

    def busy_between(self, t0: float, t1: float) -> float:
        """Slot-seconds of service inside [t0, t1) (requests still running excluded)."""
        return sum(
            max(0.0, min(e, t1) - max(s, t0)) for s, e in zip(self.starts, self.ends, strict=True)
        )


class FaultyEnv(SimulatedEnvironmentService):
    """The simulated Environment Service with jittered latencies and injected faults.

    Every create and step draws its time (log-normal around the scenario's mean) and
    whether it fails with `SandboxError` from (seed, attempt id, op index): the first
    attempt of a task meets exactly the same faults in both systems; MegaFlow's retries
    are new attempts with new draws. On top of the command's own work, each operation
    pays its system's `path` (`EnvPath`: measured, fixed costs of getting a sandbox and
    of reaching it per operation). With `cores`, each operation holds one of that many
    cores for its CPU-bound part (`env_cpu_fraction` of the work, `op_cpu` of the
    path's cost: the monolith's co-hosted sandboxes); without, operations never wait
    for a core (MegaFlow's separate environment hosts).
    """

    def __init__(self, scenario: Scenario, path: EnvPath, *, cores: int | None = None) -> None:
        super().__init__(SimulatedEnvConfig())
        self.scenario = scenario
        self.path = path
        self._cores = asyncio.Semaphore(cores) if cores else None
        self._owners: dict[str, tuple[str, list[int]]] = {}
        self.ops = 0  # creates included
        self.creates = 0
        self.faults = 0
        self.op_seconds = 0.0  # modelled seconds of environment work, waits excluded
        self.path_seconds = 0.0  # of which the path's costs (creates and operations)
        self.cpu_seconds = 0.0  # of which holding a core
        self.core_wait_s = 0.0  # modelled seconds spent waiting for a core
        self.held_starts = array("d")  # wall-clock intervals holding a core (CPU part)
        self.held_ends = array("d")

    async def _op(self, owner: str, index: int, mean: float, cost_s: float, cpu: float) -> None:
        """One operation: `mean` of own work (jittered) plus `cost_s` of the path."""
        sc = self.scenario
        work = lognormal(mean, sc.jitter_sigma, unit(sc.seed, "lat", owner, index))
        fails = unit(sc.seed, "fault", owner, index) < sc.fault_rate
        self.ops += 1
        self.op_seconds += work + cost_s
        self.path_seconds += cost_s
        held = work * sc.env_cpu_fraction + cost_s * cpu
        self.cpu_seconds += held
        busy = held * sc.time_scale
        idle = (work + cost_s) * sc.time_scale - busy
        if self._cores is not None and busy > 0:
            asked = time.monotonic()
            async with self._cores:
                self.core_wait_s += (time.monotonic() - asked) / sc.time_scale
                await self._hold(busy)
        elif busy > 0:
            await self._hold(busy)
        if idle > 0:
            await asyncio.sleep(idle)
        if fails:
            self.faults += 1
            raise SandboxError(f"injected sandbox fault ({owner}, op {index})")

    async def _hold(self, seconds: float) -> None:
        start = time.monotonic()
        try:
            await asyncio.sleep(seconds)
        finally:  # both ends together, so the arrays stay paired
            self.held_starts.append(start)
            self.held_ends.append(time.monotonic())

    def held_between(self, t0: float, t1: float) -> float:
        """Core-seconds (wall) held inside [t0, t1) (holds still going excluded)."""
        return sum(
            max(0.0, min(e, t1) - max(s, t0))
            for s, e in zip(self.held_starts, self.held_ends, strict=True)
        )

    def path_s_per_op(self) -> float:
        """Mean path cost of an operation other than a create (modelled seconds)."""
        others = self.ops - self.creates
        return (self.path_seconds - self.creates * self.path.create_s) / others if others else 0.0

    def _next(self, env_id: str) -> tuple[str, int]:
        owner, counter = self._owners[env_id]
        counter[0] += 1
        return owner, counter[0]

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        path = self.path
        self.creates += 1
        await self._op(request.owner, 0, 0.0, path.create_s, path.create_cpu)
        reply = await super().create_environment(request)
        self._owners[reply.env_id] = (request.owner, [0])
        return reply

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse:
        if request.env_id in self._owners:
            owner, index = self._next(request.env_id)
            await self._op(owner, index, self.scenario.step_s, self.path.op_s, self.path.op_cpu)
        return await super().execute_step(request)

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse:
        if request.env_id in self._owners:
            submit = request.WhichOneof("action") == "submit"
            mean = self.scenario.scoring_s if submit else self.scenario.edit_s
            owner, index = self._next(request.env_id)
            await self._op(owner, index, mean, self.path.op_s, self.path.op_cpu)
        return await super().submit_action(request)

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        self._owners.pop(request.env_id, None)
        return await super().release_environment(request)
