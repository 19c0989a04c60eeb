"""The Model Service: chat completions from named backends.

Holds one backend per model name (`megaflow.model.backend.ModelBackend`) and answers
the `ModelService` contract. Replicas, routing and hot-swapped versions build on this
(one name → several backends) in later work.
"""

from __future__ import annotations

from megaflow.core.errors import InvalidRequestError, NotFoundError
from megaflow.model.backend import ModelBackend
from megaflow.v1 import common_pb2, model_pb2

_ROLES = {"system", "user", "assistant", "tool"}


def validate_generate(request: model_pb2.GenerateRequest) -> None:
    """Reject malformed chats with a clear error before they reach a backend."""
    if not request.messages:
        raise InvalidRequestError("GenerateRequest.messages is empty")
    for i, message in enumerate(request.messages):
        if message.role not in _ROLES:
            raise InvalidRequestError(
                f"GenerateRequest.messages[{i}].role is {message.role!r}; "
                f"expected one of {sorted(_ROLES)}"
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                f"GenerateRequest.messages[{i}] is a tool result without tool_call_id"
            )
    if request.temperature < 0:
        raise InvalidRequestError("GenerateRequest.temperature must be >= 0")


class ModelServiceImpl:
    """Serves `GenerateRequest`s from the backend named by `request.model`."""

    def __init__(self, backends: list[ModelBackend], default: str | None = None) -> None:
        if not backends:
            raise ValueError("a Model Service needs at least one backend")
        self._backends = {b.name: b for b in backends}
        self.default = default or backends[0].name
        if self.default not in self._backends:
            raise ValueError(f"default model {self.default!r} is not among the backends")

    def backend(self, name: str) -> ModelBackend:
        backend = self._backends.get(name or self.default)
        if backend is None:
            raise NotFoundError(f"no model named {name!r}; known: {sorted(self._backends)}")
        return backend

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        validate_generate(request)
        return await self.backend(request.model).generate(request)

    async def list_models(
        self, request: model_pb2.ListModelsRequest
    ) -> model_pb2.ListModelsResponse:
        return model_pb2.ListModelsResponse(
            models=[
                model_pb2.ModelInfo(name=b.name, version=b.version, backend=b.kind)
                for b in self._backends.values()
            ]
        )

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(ok=True, detail=f"{len(self._backends)} model(s)")

    def stats(self) -> dict[str, model_pb2.ModelStats]:
        return {name: b.stats() for name, b in self._backends.items()}

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 0.0) -> None:
        for backend in self._backends.values():
            await backend.close()
