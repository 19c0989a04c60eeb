"""Turns a service address into a client of that service.

The empty address means "in this process": the resolver hands out the local
implementation itself (the in-process transport). So does an address mapped to a local
implementation with `set_local(kind, impl, address=...)` (several in-process services
of one kind under distinct addresses, e.g. env hosts in a benchmark). Any other
`host:port` gets a gRPC client, cached per address, with the same methods.
"""

from __future__ import annotations

from megaflow.contract import AgentService, EnvironmentService, ModelService
from megaflow.core.errors import ServiceUnavailableError
from megaflow.rpc.clients import (
    AgentServiceClient,
    EnvironmentServiceClient,
    GrpcClient,
    ModelServiceClient,
)

LOCAL = ""


class ServiceResolver:
    def __init__(
        self,
        *,
        model: ModelService | None = None,
        env: EnvironmentService | None = None,
        agent: AgentService | None = None,
    ) -> None:
        self._local: dict[str, object | None] = {"model": model, "env": env, "agent": agent}
        self._clients: dict[tuple[str, str], GrpcClient] = {}
        self._local_at: dict[tuple[str, str], object] = {}

    def set_local(self, kind: str, impl: object, *, address: str = LOCAL) -> None:
        if address == LOCAL:
            self._local[kind] = impl
        else:
            self._local_at[(kind, address)] = impl

    def _resolve(self, kind: str, address: str, cls: type[GrpcClient]) -> object:
        local = self._local_at.get((kind, address))
        if local is not None:
            return local
        if address == LOCAL:
            impl = self._local.get(kind)
            if impl is None:
                raise ServiceUnavailableError(f"no in-process {kind} service in this process")
            return impl
        key = (kind, address)
        if key not in self._clients:
            self._clients[key] = cls(address)
        return self._clients[key]

    def model(self, address: str) -> ModelService:
        return self._resolve("model", address, ModelServiceClient)  # type: ignore[return-value]

    def env(self, address: str) -> EnvironmentService:
        return self._resolve("env", address, EnvironmentServiceClient)  # type: ignore[return-value]

    def agent(self, address: str) -> AgentService:
        return self._resolve("agent", address, AgentServiceClient)  # type: ignore[return-value]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
