"""Build a model backend from a short spec: `simulated` or `openai:URL[#model]`."""

from __future__ import annotations

from megaflow.core.errors import InvalidRequestError
from megaflow.model.backend import ModelBackend
from megaflow.model.latency import GpuLatencyModel, LatencyConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig
from megaflow.model.simulated import SimulatedBackend


def backend_from_spec(
    spec: str,
    *,
    success_rate: float = 0.8,
    seed: int = 0,
    latency: LatencyConfig | None = None,
    request_timeout_s: float = 120.0,
) -> ModelBackend:
    """`simulated` → the in-package policy behind a GPU latency model;
    `openai:http://host:port[#model]` → an OpenAI-compatible server."""
    if spec == "simulated":
        return SimulatedBackend(
            success_rate=success_rate,
            seed=seed,
            latency=GpuLatencyModel(latency or LatencyConfig()),
        )
    if spec.startswith("openai:"):
        url, _, model = spec.removeprefix("openai:").partition("#")
        if not url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"model spec {spec!r}: expected openai:http(s)://HOST:PORT")
        return OpenAIBackend(
            OpenAIBackendConfig(
                base_url=url,
                model=model,
                name=model or "openai",  # the upstream's first model when none is named
                request_timeout_s=request_timeout_s,
            )
        )
    raise InvalidRequestError(f"unknown model spec {spec!r}: use 'simulated' or 'openai:URL'")
