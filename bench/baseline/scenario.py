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

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import SandboxError
from megaflow.env.simulated import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.model.latency import GpuLatencyModel, LatencyConfig, Served
from megaflow.v1 import env_pb2

MIB = 1024 * 1024
GIB = 1024 * MIB


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
    # -- the simulated environment (identical for both systems) ---------------------------
    create_s: float = Field(default=0.2, description="Mean sandbox create time.")
    step_s: float = Field(default=0.3, description="Mean `bash` step time.")
    edit_s: float = Field(default=0.02, description="Mean file-edit time.")
    scoring_s: float = Field(default=0.5, description="Mean evaluation time on submit.")
    jitter_sigma: float = Field(
        default=0.6, ge=0, description="Log-normal sigma of every environment time (mean kept)."
    )
    fault_rate: float = Field(
        default=0.01, ge=0, le=1, description="P(SandboxError) per create and per step."
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

    def latency_config(self) -> LatencyConfig:
        return LatencyConfig(
            slots=self.slots_per_replica,
            prefill_s_per_token=self.prefill_s_per_token,
            decode_s_per_token=self.decode_s_per_token,
            overhead_s=self.model_overhead_s,
            time_scale=self.time_scale,
            decode_batch_slowdown=self.decode_batch_slowdown,
            prefix_cache_tokens=self.prefix_cache_tokens,
        )

    @property
    def gpu_slots(self) -> int:
        return self.replicas * self.slots_per_replica

    @property
    def env_cores(self) -> int:
        """Cores left on the GPU node for the monolith's environment operations."""
        return max(self.node_cores - self.inference_cores, 1)

    def memory_cap(self, per_task_mib: float) -> int:
        """How many tasks of `per_task_mib` the node's usable memory holds."""
        usable = self.node_memory_gib * 1024 * (1 - self.reserved_memory_fraction)
        return int(usable // per_task_mib)


QUICK = Scenario(
    time_scale=0.5,
    replicas=2,
    slots_per_replica=16,
    node_cores=10,
    inference_cores=2,
    baseline_levels=(4, 8, 16, 32),
    megaflow_levels=(16, 64, 96),
)


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
    throughput and busy slot-time can be read over any window, not only since start."""

    def __init__(self, config: LatencyConfig) -> None:
        super().__init__(config)
        self.starts = array("d")
        self.ends = array("d")

    async def serve(
        self, prompt_tokens: int, completion_tokens: int, prefix_key: str | None = None
    ) -> Served:  # `run` calls it too
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
    are new attempts with new draws. With `cores`, each operation holds one of that many
    cores for `env_cpu_fraction` of its time (the monolith's co-hosted sandboxes);
    without, operations never wait for CPU (MegaFlow's separate environment hosts).
    """

    def __init__(self, scenario: Scenario, *, cores: int | None = None) -> None:
        super().__init__(SimulatedEnvConfig())
        self.scenario = scenario
        self._cores = asyncio.Semaphore(cores) if cores else None
        self._owners: dict[str, tuple[str, list[int]]] = {}
        self.ops = 0
        self.faults = 0
        self.op_seconds = 0.0  # modelled seconds of environment work, waits excluded
        self.core_wait_s = 0.0  # modelled seconds spent waiting for a core

    async def _op(self, owner: str, index: int, mean: float) -> None:
        sc = self.scenario
        work = lognormal(mean, sc.jitter_sigma, unit(sc.seed, "lat", owner, index))
        fails = unit(sc.seed, "fault", owner, index) < sc.fault_rate
        self.ops += 1
        self.op_seconds += work
        busy = work * sc.env_cpu_fraction * sc.time_scale
        idle = work * sc.time_scale - busy
        if self._cores is not None and busy > 0:
            asked = time.monotonic()
            async with self._cores:
                self.core_wait_s += (time.monotonic() - asked) / sc.time_scale
                await asyncio.sleep(busy)
        elif busy > 0:
            await asyncio.sleep(busy)
        if idle > 0:
            await asyncio.sleep(idle)
        if fails:
            self.faults += 1
            raise SandboxError(f"injected sandbox fault ({owner}, op {index})")

    def _next(self, env_id: str) -> tuple[str, int]:
        owner, counter = self._owners[env_id]
        counter[0] += 1
        return owner, counter[0]

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        await self._op(request.owner, 0, self.scenario.create_s)
        reply = await super().create_environment(request)
        self._owners[reply.env_id] = (request.owner, [0])
        return reply

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse:
        if request.env_id in self._owners:
            await self._op(*self._next(request.env_id), self.scenario.step_s)
        return await super().execute_step(request)

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse:
        if request.env_id in self._owners:
            submit = request.WhichOneof("action") == "submit"
            mean = self.scenario.scoring_s if submit else self.scenario.edit_s
            await self._op(*self._next(request.env_id), mean)
        return await super().submit_action(request)

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        self._owners.pop(request.env_id, None)
        return await super().release_environment(request)
