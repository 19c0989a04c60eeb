"""The interface every model backend implements.

A backend turns one `GenerateRequest` into one `GenerateResponse`. The Model
Service (`megaflow.model.service`) holds one or more backends by model name.
Implementations: `SimulatedBackend` (an in-package policy behind a GPU latency
model, for the embedded default, tests and benchmarks) and `OpenAIBackend` (any
OpenAI-compatible chat-completions server, over aiohttp).

Streaming is optional: a backend may also have `generate_stream(request)`, an async
iterator of `GenerateChunk`s as tokens are produced, the last one carrying the whole
answer in `final` (see `model.proto`). `stream_backend` calls it, or, for a backend
without one, yields the whole answer of `generate` as one chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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


def whole_answer_chunk(response: model_pb2.GenerateResponse) -> model_pb2.GenerateChunk:
    """A whole answer as the one (last) chunk of a stream."""
    return model_pb2.GenerateChunk(
        text=response.message.content,
        token_ids=response.completion_token_ids,
        logprobs=response.completion_logprobs,
        final=response,
    )


def stream_backend(
    backend: ModelBackend, request: model_pb2.GenerateRequest
) -> AsyncIterator[model_pb2.GenerateChunk]:
    """`backend.generate_stream(request)` if the backend streams, else its whole
    answer as one chunk. (The backend's own iterator, so that closing it closes the
    backend's stream at once.)"""
    stream = getattr(backend, "generate_stream", None)
    if stream is not None:
        chunks: AsyncIterator[model_pb2.GenerateChunk] = stream(request)
        return chunks
    return _one_chunk(backend, request)


async def _one_chunk(
    backend: ModelBackend, request: model_pb2.GenerateRequest
) -> AsyncIterator[model_pb2.GenerateChunk]:
    yield whole_answer_chunk(await backend.generate(request))
