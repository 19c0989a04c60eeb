"""The one table that maps MegaFlow errors to gRPC status codes and back.

The server sets the status code from the table and names the exact error class in
the trailing metadata key `megaflow-error`, so a client raises the same class the
service raised. Errors that carry no class name (a connection refused, a deadline
set by the client, a request that could not be decoded) map by status code alone.
"""

from __future__ import annotations

import grpc

from megaflow.core import errors as e

ERROR_METADATA_KEY = "megaflow-error"

# Most specific classes first: the first match wins.
_TO_STATUS: list[tuple[type[e.MegaFlowError], grpc.StatusCode]] = [
    (e.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.CancelledTaskError, grpc.StatusCode.CANCELLED),
    (e.InfrastructureError, grpc.StatusCode.UNAVAILABLE),
    (e.MegaFlowError, grpc.StatusCode.FAILED_PRECONDITION),
]

_BY_NAME: dict[str, type[e.MegaFlowError]] = {
    cls.__name__: cls
    for cls in (
        e.MegaFlowError,
        e.InvalidRequestError,
        e.NotFoundError,
        e.InfrastructureError,
        e.SandboxError,
        e.ModelUnavailableError,
        e.ServiceUnavailableError,
        e.CapacityError,
        e.DeadlineExceededError,
        e.CancelledTaskError,
    )
}

_BY_STATUS: dict[grpc.StatusCode, type[e.MegaFlowError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: e.NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.CapacityError,
    grpc.StatusCode.DEADLINE_EXCEEDED: e.DeadlineExceededError,
    # A bare CANCELLED (no `megaflow-error` class) is the server cancelling the call,
    # e.g. while shutting down: the platform failed, a retry elsewhere helps. A task
    # cancelled on purpose arrives as CancelledTaskError by name.
    grpc.StatusCode.CANCELLED: e.ServiceUnavailableError,
    grpc.StatusCode.UNAVAILABLE: e.ServiceUnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: e.MegaFlowError,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code a service answers with for `error` (INTERNAL for bugs)."""
    for cls, code in _TO_STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(code: grpc.StatusCode, details: str, class_name: str | None) -> e.MegaFlowError:
    """The MegaFlow error a client raises for a failed call."""
    cls = _BY_NAME.get(class_name or "") or _BY_STATUS.get(code)
    if cls is None:
        # INTERNAL, UNKNOWN, ...: the remote side failed; a retry elsewhere may help.
        return e.InfrastructureError(f"remote call failed with {code.name}: {details}")
    return cls(details or code.name)
