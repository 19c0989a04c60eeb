"""Settings of one Environment Service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EnvServiceConfig(BaseModel):
    """Settings of one Environment Service (its sandbox backends: local bubblewrap by
    default, Docker where an endpoint is set, any registered plug-in)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root_dir: Path = Field(
        default=Path("/tmp/megaflow/sandboxes"),
        description="Host directory holding each sandbox's workspace and state.",
    )
    image_cache_dir: Path = Field(
        default=Path("/tmp/megaflow/images"),
        description="Cache of provisioned local-backend images (rootfs folders, by digest).",
    )
    image_cache_mib: int = Field(
        default=20_480, ge=1, description="Disk budget of the image cache; LRU eviction past it."
    )
    insecure_registries: tuple[str, ...] = Field(
        default=(),
        description="Registries (HOST[:PORT] as image references write them) the local "
        "backend may reach over plain HTTP or unverified TLS; all others: HTTPS, verified.",
    )
    registry_auth_file: Path | None = Field(
        default=None,
        description="Registry credentials for the local backend's pulls (containers "
        "auth.json or Docker config.json); default: skopeo's search, $REGISTRY_AUTH_FILE "
        "first, ~/.docker/config.json last.",
    )
    registry_cert_dir: Path | None = Field(
        default=None,
        description="Extra CA certificates (*.crt) trusted for registries over HTTPS.",
    )
    max_environments: int = Field(
        default=512,
        ge=1,
        description="Hard cap on sandboxes: in use, starting, resetting and pooled all count.",
    )
    memory_mib: int = Field(default=1024, ge=16, description="Default memory limit per sandbox.")
    pids: int = Field(default=256, ge=8, description="Default process-count limit per sandbox.")
    output_bytes: int = Field(default=64_000, ge=1024, description="Default cap on step output.")
    step_timeout_s: float = Field(default=60.0, gt=0, description="Default per-command budget.")
    max_step_timeout_s: float = Field(default=3600.0, gt=0, description="Largest budget allowed.")
    setup_timeout_s: float = Field(default=60.0, gt=0, description="Default sandbox setup budget.")
    scoring_timeout_s: float = Field(default=120.0, gt=0, description="Default evaluation budget.")
    lease_s: float = Field(default=900.0, gt=0, description="Default lease; renewed by each call.")
    reap_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often expired leases (and idle environments) are checked.",
    )
    default_backend: str = Field(
        default="local",
        min_length=1,
        description="Backend of requests whose placement names none, and of the warm pools: "
        "any registered sandbox backend (`megaflow.env.registry`), checked at start.",
    )
    backends: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings of sandbox backends by name, each validated by its backend's "
        "config class; a backend named here is offered (and reclaimed) from the start.",
    )
    docker_host: str | None = Field(
        default=None,
        description="Docker Engine endpoint (unix:///path/docker.sock); None: no docker backend.",
    )
    warm_pool: dict[str, int] = Field(
        default_factory=dict,
        description="Image -> number of idle, started sandboxes kept ready (default limits).",
    )
    warm_pool_default: int = Field(
        default=0,
        ge=0,
        description="Warm-pool size of images claimed but not named in `warm_pool`.",
    )
    max_idle_per_key: int = Field(
        default=16,
        ge=0,
        description="Persistent mode: reset sandboxes kept idle per pool key beyond its warm size.",
    )
    liveness_timeout_s: float = Field(
        default=2.0, gt=0, description="Budget of the `true` probe run before a hand-out."
    )
    idle_suspend_s: float | None = Field(
        default=None,
        gt=0,
        description="Suspend an environment after this many idle seconds; None: never.",
    )
    artifact_dir: Path = Field(
        default=Path("/tmp/megaflow/artifacts"),
        description="Directory of workspace snapshots when `artifact_url` is empty.",
    )
    artifact_url: str = Field(
        default="",
        description="fsspec URL prefix of the snapshot store (e.g. memory://snaps, s3://b/p); "
        "empty: `artifact_dir`. Snapshot and restore URIs must lie under it; workspace "
        "artifacts (sha256:<hex>) are read from its blobs/ folder.",
    )
    artifact_cache_dir: Path = Field(
        default=Path("/tmp/megaflow/artifact-cache"),
        description="This host's cache of workspace artifacts (by digest) and git mirrors.",
    )
    artifact_cache_mib: int = Field(
        default=20_480,
        ge=1,
        description="Disk budget of the cached artifacts; LRU eviction past it (git mirrors "
        "are not counted).",
    )
