"""Build a model backend from a short spec: ``NAME`` or ``NAME:ARGUMENT``.

The name resolves through a registry (`megaflow.core.registry`, the pattern the
scaffolds, sandbox backends, task sources and log parsers share) to a builder,
``build(spec, options) -> ModelBackend``, which reads the rest of its own spec:

- ``simulated``: the in-package policy behind a GPU latency model (the embedded
  default). It is a fixture (`megaflow.testing.simulated_model`) and is registered by
  its dotted path, so that `megaflow.model` never imports `megaflow.testing`;
- ``openai:http://host:port[#model]``: an OpenAI-compatible server;
- ``transformers:/path``: a local Hugging Face model (needs the `transformers` extra);
- any name declared under the entry-point group ``megaflow.model_backends``::

      [project.entry-points."megaflow.model_backends"]
      my-server = "my_package.backend:build"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megaflow.core.errors import InvalidRequestError
from megaflow.core.registry import Registry, load_dotted
from megaflow.model.backend import ModelBackend
from megaflow.model.latency import LatencyConfig
from megaflow.model.openai import OpenAIBackend, OpenAIBackendConfig

__all__ = ["MODEL_BACKENDS", "BackendBuilder", "BackendOptions", "backend_from_spec", "spec_of"]


@dataclass(frozen=True)
class BackendOptions:
    """What a spec does not say; each builder reads the options it has a use for."""

    success_rate: float = 0.8
    """Simulated: the fraction of tasks the policy solves."""
    seed: int = 0
    """Simulated: the seed of the policy's per-task draws."""
    latency: LatencyConfig | None = None
    """Simulated: the GPU latency model (None: its defaults)."""
    request_timeout_s: float = 120.0
    """OpenAI: the time one request may take."""
    name: str | None = None
    """The backend's model name, overriding its own (how a hot swap tags a new version)."""
    version: str | None = None
    """The backend's version, overriding its own."""
    checkpoint: str = ""
    """Transformers: new weights replacing the spec's path (a hot swap)."""


BackendBuilder = Callable[[str, BackendOptions], ModelBackend]

MODEL_BACKENDS: Registry[BackendBuilder] = Registry(
    "megaflow.model_backends", "model backend", check=callable
)
"""Every model backend builder by the name its specs start with."""


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
    """The backend ``spec`` names (`simulated`, `openai:URL[#model]`, `transformers:PATH`
    or a plug-in's), built with the options its builder reads (`BackendOptions`)."""
    kind = spec.partition(":")[0]
    if not kind or kind not in MODEL_BACKENDS.names():
        raise InvalidRequestError(
            f"unknown model spec {spec!r}: use 'simulated', 'openai:URL' or 'transformers:PATH'"
        )
    options = BackendOptions(
        success_rate=success_rate,
        seed=seed,
        latency=latency,
        request_timeout_s=request_timeout_s,
        name=name,
        version=version,
        checkpoint=checkpoint,
    )
    return MODEL_BACKENDS.get(kind)(spec, options)


def _openai(spec: str, options: BackendOptions) -> ModelBackend:
    url, _, model = spec.removeprefix("openai:").partition("#")
    if not url.startswith(("http://", "https://")):
        raise InvalidRequestError(f"model spec {spec!r}: expected openai:http(s)://HOST:PORT")
    return OpenAIBackend(
        OpenAIBackendConfig(
            base_url=url,
            model=model,
            # the upstream's first model when none is named
            name=options.name or model or "openai",
            version=options.version or "upstream",
            request_timeout_s=options.request_timeout_s,
        )
    )


def _transformers(spec: str, options: BackendOptions) -> ModelBackend:
    from megaflow.model.transformers_backend import (  # torch is imported only here
        TransformersBackend,
        TransformersBackendConfig,
    )

    path = options.checkpoint or spec.removeprefix("transformers:")
    if not path:
        raise InvalidRequestError(f"model spec {spec!r}: expected transformers:/path/to/model")
    return TransformersBackend(
        TransformersBackendConfig(
            path=Path(path), name=options.name or "", version=options.version or ""
        )
    )


MODEL_BACKENDS.add(
    "simulated", lambda: load_dotted("megaflow.testing.simulated_model:build_simulated")
)
MODEL_BACKENDS.add("openai", lambda: _openai)
MODEL_BACKENDS.add("transformers", lambda: _transformers)


def spec_of(backend: ModelBackend) -> str | None:
    """The spec that builds a backend like `backend` again, if it has one."""
    if backend.kind == "simulated":
        return "simulated"
    if isinstance(backend, OpenAIBackend):
        return f"openai:{backend.base_url}" + (f"#{backend.model}" if backend.model else "")
    return None
