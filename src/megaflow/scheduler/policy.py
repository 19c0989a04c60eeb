"""The scheduler's policy: retries, admission limits and the placement strategy."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SchedulerPolicy(BaseModel):
    """Retries, admission control and placement of the scheduler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 6 attempts 1 s apart, doubling: 1+2+4+8+16 = 31 s of backoff outlast a crashed
    # service's restart (or the 3 missed heartbeats after which it is dropped), even while
    # gRPC's own reconnect backoff (1 s, x1.6) keeps failing calls to the restarted address.
    default_max_attempts: int = Field(
        default=6, ge=1, description="Attempts of a task whose spec sets no max_attempts."
    )
    retry_base_s: float = Field(
        default=1.0, ge=0, description="Backoff before the first retry; doubles per attempt."
    )
    retry_max_s: float = Field(default=30.0, ge=0, description="Longest backoff between attempts.")
    quarantine_after: int = Field(
        default=3,
        ge=0,
        description="Quarantine a task (FAILED, ERROR_KIND_INFRA, no reward) once this many of "
        "its attempts ended with the loss of their worker (agent or env service died or went "
        "silent); 0 = never. One poison task then cannot take the fleet down forever.",
    )
    host_backoff_base_s: float = Field(
        default=1.0,
        ge=0,
        description="A service found down (unreachable, or silent) stays out of placement "
        "at least this long after its first fall, doubling with each fall in a row "
        "(jittered), even if it re-registers sooner; a completed attempt on it resets it.",
    )
    host_backoff_max_s: float = Field(
        default=30.0, ge=0, description="Longest a fallen service is kept out of placement."
    )
    host_rejoin_s: float = Field(
        default=2.5,
        ge=0,
        description="A service that comes back after being down is placed this long after "
        "it re-registers: the clients' channels to it wait out gRPC's reconnect backoff "
        "(at most 2 s, `megaflow.rpc.server.CHANNEL_OPTIONS`) and would fail at once.",
    )
    max_outage_retries: int = Field(
        default=20,
        ge=0,
        description="Attempts lost to an outage (a service of the attempt unreachable or "
        "lost) are retried without counting towards max_attempts, up to this many per "
        "task: the task waits for a host instead of burning its attempts.",
    )
    pools: dict[str, int] = Field(
        default_factory=dict,
        description="Named resource pools (semaphores): name -> max concurrent attempts. "
        "A task naming a pool not listed here is rejected at submit.",
    )
    user_max_in_flight: dict[str, int] = Field(
        default_factory=dict, description="Per-user quota: user -> max attempts in flight."
    )
    default_user_max_in_flight: int = Field(
        default=0, ge=0, description="Quota of users not in user_max_in_flight; 0 = unlimited."
    )
    model_max_in_flight: dict[str, int] = Field(
        default_factory=dict,
        description="Model-API limit: model name ('' = the default model) -> max tasks in flight.",
    )
    model_dispatch_rate: dict[str, float] = Field(
        default_factory=dict,
        description="Model-API rate limit: model name -> max dispatches per second "
        "(token bucket holding one second's worth, at least 1).",
    )
    placement: Literal["packing", "least_loaded", "random"] = Field(
        default="packing",
        description="Environment-host choice: 'packing' (level 1: warm pool > image cache > "
        "neither, then least loaded; agent beside its environment), 'least_loaded', or "
        "'random' (baselines for the packing benchmark).",
    )
    seed: int = Field(default=0, description="Seed of the 'random' placement.")
    wait_samples: int = Field(
        default=4096, ge=1, description="Queue waits of the latest dispatches kept for status."
    )
