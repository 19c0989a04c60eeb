"""Build a model backend from a short spec: `simulated` or `openai:URL[#model]`."""

from __future__ import annotations

from pathlib import Path

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
    name: str | None = None,
    version: str | None = None,
    checkpoint: str = "",
) -> ModelBackend:
    """`simulated` → the in-package policy behind a GPU latency model;
    `openai:http://host:port[#model]` → an OpenAI-compatible server.

    `name` and `version` override the backend's own (how a hot swap tags a new version);
    `transformers:/path` → a local Hugging Face model (needs the `transformers` extra);
    `checkpoint` (with a `transformers:` spec) replaces the path: new weights for a hot swap.
    """
    if spec == "simulated":
        return SimulatedBackend(
            name=name or "simulated",
            version=version or "sim-1",
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
                # the upstream's first model when none is named
                name=name or model or "openai",
                version=version or "upstream",
                request_timeout_s=request_timeout_s,
            )
        )
    if spec.startswith("transformers:"):
        from megaflow.model.transformers_backend import (  # torch is imported only here
            TransformersBackend,
            TransformersBackendConfig,
        )

        path = checkpoint or spec.removeprefix("transformers:")
        if not path:
            raise InvalidRequestError(f"model spec {spec!r}: expected transformers:/path/to/model")
        return TransformersBackend(
            TransformersBackendConfig(path=Path(path), name=name or "", version=version or "")
        )
    raise InvalidRequestError(
        f"unknown model spec {spec!r}: use 'simulated', 'openai:URL' or 'transformers:PATH'"
    )


def spec_of(backend: ModelBackend) -> str | None:
    """The spec that builds a backend like `backend` again, if it has one."""
    if backend.kind == "simulated":
        return "simulated"
    if isinstance(backend, OpenAIBackend):
        return f"openai:{backend.base_url}" + (f"#{backend.model}" if backend.model else "")
    return None
