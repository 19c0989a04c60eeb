"""MegaFlow's errors. Every error says whether a retry can help.

    MegaFlowError                      root; .retryable, .kind
    ├── InvalidRequestError(ValueError)   malformed input; never retried
    ├── NotFoundError(KeyError)           unknown id (environment, task, model)
    ├── InfrastructureError               the platform failed; retried, never reward 0
    │   ├── SandboxError                  a sandbox could not start or died
    │   ├── ModelUnavailableError         a model backend failed or is unreachable
    │   ├── ServiceUnavailableError       a remote service could not be reached
    │   ├── CapacityError                 no capacity right now
    │   └── DeadlineExceededError(TimeoutError)  a platform budget ran out
    ├── CancelledTaskError                the task was cancelled
    └── AuthenticationError               a service refused the caller's credentials

`megaflow.rpc.status` maps each class to one gRPC status code and back.
"""

from __future__ import annotations

from megaflow.v1 import common_pb2


class MegaFlowError(Exception):
    """Root of every error MegaFlow raises on purpose."""

    retryable: bool = False
    kind: common_pb2.ErrorKind.ValueType = common_pb2.ERROR_KIND_TASK


class InvalidRequestError(MegaFlowError, ValueError):
    """The request is malformed; sending it again will not help."""

    kind = common_pb2.ERROR_KIND_INVALID


class NotFoundError(MegaFlowError, KeyError):
    """An id names nothing the service knows (or no longer knows)."""

    kind = common_pb2.ERROR_KIND_INFRA

    def __str__(self) -> str:  # KeyError quotes its argument; we want the message as is
        return str(self.args[0]) if self.args else ""


class InfrastructureError(MegaFlowError):
    """The platform failed, not the task. Retried; never scored as reward 0."""

    retryable = True
    kind = common_pb2.ERROR_KIND_INFRA


class SandboxError(InfrastructureError):
    """A sandbox could not be created, or died under its task."""


class ModelUnavailableError(InfrastructureError):
    """A model backend returned an error, a malformed answer, or could not be reached."""


class ServiceUnavailableError(InfrastructureError):
    """A remote MegaFlow service could not be reached. `address`: which one ("" = not
    known); it crosses the wire with the error, so the scheduler can set that service
    aside without reading the message."""

    def __init__(self, message: str = "", *, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class CapacityError(InfrastructureError):
    """No capacity is free right now; try again later."""


class DeadlineExceededError(InfrastructureError, TimeoutError):
    """A platform budget (setup, remote call, task deadline) ran out."""


class CancelledTaskError(MegaFlowError):
    """The task was cancelled by its owner."""

    kind = common_pb2.ERROR_KIND_CANCELLED


class AuthenticationError(MegaFlowError):
    """A service refused the caller's credentials (no token, a wrong one, no client
    certificate): a configuration error, so never retried; not the task's fault."""

    kind = common_pb2.ERROR_KIND_INFRA
