"""A gRPC server that serves any MegaFlow service implementation.

Handlers are built from the service descriptors of the contract: the RPC `Generate`
of `megaflow.v1.ModelService` calls `impl.generate(request)`. Every handler maps
MegaFlow errors to status codes (`megaflow.rpc.status`), and an unexpected exception
becomes INTERNAL with its message, logged, while the server keeps serving.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from megaflow.core.errors import InvalidRequestError
from megaflow.rpc import auth
from megaflow.rpc.status import error_metadata, status_for
from megaflow.v1 import agent_pb2, env_pb2, model_pb2, scheduler_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted service is reached again within ~2 s (gRPC's default backoff grows to
    # 120 s), so retried tasks find it instead of exhausting their attempts.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

SERVICES: dict[str, ServiceDescriptor] = {
    "model": model_pb2.DESCRIPTOR.services_by_name["ModelService"],
    "env": env_pb2.DESCRIPTOR.services_by_name["EnvironmentService"],
    "agent": agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
}


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _Undecodable:
    """Stands in for a request whose bytes are not the expected message."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.error = InvalidRequestError(f"request is not a valid {type_name}: {error}")


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | _Undecodable]:
    def decode(data: bytes) -> Message | _Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as error:  # answered as INVALID_ARGUMENT by the handler
            return _Undecodable(cls.DESCRIPTOR.full_name, error)

    return decode


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in a handler", exc_info=error)
    context.set_trailing_metadata(error_metadata(error))
    await context.abort(code, f"{type(error).__name__}: {error}")


def _unary(fn: Callable[[Message], Awaitable[Message]]) -> Callable[..., Awaitable[Message]]:
    async def handler(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        try:
            if isinstance(request, _Undecodable):
                raise request.error
            return await fn(request)
        except Exception as error:  # every error becomes a status; the server keeps serving
            await _abort(context, error)
            raise  # unreachable: abort raises

    return handler


def _stream(
    fn: Callable[[Message], AsyncIterator[Message]],
) -> Callable[..., AsyncIterator[Message]]:
    async def handler(
        request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Message]:
        try:
            if isinstance(request, _Undecodable):
                raise request.error
            async for item in fn(request):
                yield item
        except Exception as error:
            await _abort(context, error)

    return handler


def generic_handler(kind: str, impl: object) -> grpc.GenericRpcHandler:
    """Route every RPC of the service `kind` to the snake_case method of `impl`."""
    service = SERVICES[kind]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        fn = getattr(impl, snake_case(method.name))
        in_cls = _message_class(method.input_type.full_name)
        out_cls = _message_class(method.output_type.full_name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(fn),
                request_deserializer=_deserializer(in_cls),
                response_serializer=out_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn),
                request_deserializer=_deserializer(in_cls),
                response_serializer=out_cls.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _message_class(full_name: str) -> type[Message]:
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)  # type: ignore[no-any-return]


class GrpcServer:
    """One grpc.aio server hosting one or more MegaFlow services.

    `security`: who may call it (default: this process's, `megaflow.rpc.auth.current()`):
    a token checked on every RPC, mutual TLS, or neither (then only a loopback `listen`
    is allowed, unless `security.insecure`)."""

    def __init__(
        self,
        listen: str,
        services: dict[str, object],
        *,
        security: auth.RpcSecurity | None = None,
    ) -> None:
        self._listen = listen
        self._services = services
        self.security = security if security is not None else auth.current()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        self.security.check_bind(self._listen)
        server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=self.security.interceptors())
        server.add_generic_rpc_handlers(
            tuple(generic_handler(kind, impl) for kind, impl in self._services.items())
        )
        if self.security.tls:
            self.port = server.add_secure_port(self._listen, self.security.server_credentials())
        else:
            self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await server.start()
        self._server = server

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
