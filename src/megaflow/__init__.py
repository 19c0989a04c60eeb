"""MegaFlow: agent tasks at scale through Model, Agent and Environment services."""

from megaflow.core.errors import (
    CancelledTaskError,
    CapacityError,
    DeadlineExceededError,
    InfrastructureError,
    InvalidRequestError,
    MegaFlowError,
    ModelUnavailableError,
    NotFoundError,
    SandboxError,
    ServiceUnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "CancelledTaskError",
    "CapacityError",
    "DeadlineExceededError",
    "InfrastructureError",
    "InvalidRequestError",
    "MegaFlowError",
    "ModelUnavailableError",
    "NotFoundError",
    "SandboxError",
    "ServiceUnavailableError",
    "__version__",
]
