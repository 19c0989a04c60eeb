"""The interface every model backend implements.

A backend turns one `GenerateRequest` into one `GenerateResponse`. The Model
Service (`megaflow.model.service`) holds one or more backends by model name.
Implementations: `SimulatedBackend` (an in-package policy behind a GPU latency
model, for the embedded default, tests and benchmarks) and `OpenAIBackend` (any
OpenAI-compatible chat-completions server, over aiohttp).
"""

from __future__ import annotations

from typing import Protocol

from megaflow.v1 import model_pb2


class ModelBackend(Protocol):
    """One model behind one mechanism."""

    name: str
    version: str
    kind: str  # "simulated" | "openai" | ...

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        """Answer one chat. Raises `ModelUnavailableError` for backend failures."""
        ...

    def stats(self) -> model_pb2.ModelStats:
        """Load and utilisation since start."""
        ...

    async def close(self) -> None:
        """Release connections and background work."""
        ...
