"""The one table that maps MegaFlow errors to gRPC status codes and back.

The server sets the status code from the table and names the exact error class in
the trailing metadata key `megaflow-error`, so a client raises the same class the
service raised, with the service's message (never parsed for the class); a
`ServiceUnavailableError`'s unreachable address travels in `megaflow-unreachable`.
Errors that carry no class name (a connection refused, a deadline set by the client,
a request that could not be decoded) map by status code alone.
"""

from __future__ import annotations

import grpc

from megaflow.core import errors as e

ERROR_METADATA_KEY = "megaflow-error"
# The address a ServiceUnavailableError names as unreachable (its `address`).
ADDRESS_METADATA_KEY = "megaflow-unreachable"

# Most specific classes first: the first match wins.
_TO_STATUS: list[tuple[type[e.MegaFlowError], grpc.StatusCode]] = [
    (e.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
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
        e.AuthenticationError,
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
    grpc.StatusCode.UNAUTHENTICATED: e.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: e.AuthenticationError,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code a service answers with for `error` (INTERNAL for bugs)."""
    for cls, code in _TO_STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a service answers `error` with: its class, and for a
    `ServiceUnavailableError` the address it could not reach."""
    metadata: tuple[tuple[str, str], ...] = ((ERROR_METADATA_KEY, type(error).__name__),)
    if isinstance(error, e.ServiceUnavailableError) and error.address:
        metadata += ((ADDRESS_METADATA_KEY, error.address),)
    return metadata


def error_from_rpc(
    code: grpc.StatusCode, details: str, class_name: str | None, address: str = ""
) -> e.MegaFlowError:
    """The MegaFlow error a client raises for a failed call (`address`: the unreachable
    address the service named, for a `ServiceUnavailableError`)."""
    cls = _BY_NAME.get(class_name or "") or _BY_STATUS.get(code)
    if cls is None:
        # INTERNAL, UNKNOWN, ...: the remote side failed; a retry elsewhere may help.
        return e.InfrastructureError(f"remote call failed with {code.name}: {details}")
    if class_name and details.startswith(f"{class_name}: "):
        details = details[len(class_name) + 2 :]  # the server's "Class: message"
    if issubclass(cls, e.ServiceUnavailableError):
        return cls(details or code.name, address=address)
    return cls(details or code.name)
