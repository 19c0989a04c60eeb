"""What the Model Service checks before routing: request validation, the request's
token weight, its rate-limit key, and the service's configuration."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import InvalidRequestError
from megaflow.model.ratelimit import RateLimitConfig
from megaflow.model.replicas import HealthConfig
from megaflow.model.router import RoutePolicy
from megaflow.v1 import model_pb2

_ROLES = {"system", "user", "assistant", "tool"}


def validate_generate(request: model_pb2.GenerateRequest) -> None:
    """Reject malformed chats with a clear error before they reach a backend."""
    if not request.messages:
        raise InvalidRequestError("GenerateRequest.messages is empty")
    for i, message in enumerate(request.messages):
        role = message.role  # (each read of a protobuf field makes a new str)
        if role not in _ROLES:
            raise InvalidRequestError(
                f"GenerateRequest.messages[{i}].role is {role!r}; expected one of {sorted(_ROLES)}"
            )
        if role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                f"GenerateRequest.messages[{i}] is a tool result without tool_call_id"
            )
    if request.temperature < 0:
        raise InvalidRequestError("GenerateRequest.temperature must be >= 0")


def estimate_tokens(request: model_pb2.GenerateRequest) -> int:
    """The request's KV weight: its encoded size at four bytes a token (the chat, tool
    calls and tool specs, which a chat template also puts in the prompt) plus
    `max_tokens`. One C call: this runs for every model request."""
    return max(1, request.ByteSize() // 4) + request.max_tokens


def client_key(request: model_pb2.GenerateRequest) -> str:
    """The rate-limit key: `client_id`, else the task id's prefix, else "default"."""
    if request.client_id:
        return request.client_id
    if request.task_id:
        for sep in ("/", ":"):
            if sep in request.task_id:
                return request.task_id.split(sep, 1)[0]
        return request.task_id
    return "default"


class ModelServiceConfig(BaseModel):
    """Routing, health, admission and hot-swap settings of the Model Service."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deadline_s: float = Field(
        default=300.0, gt=0, description="Budget of one generate call, retries and waits included."
    )
    replica_capacity: int = Field(
        default=1024, ge=1, description="Default in-flight requests per replica before queueing."
    )
    max_queue: int = Field(
        default=10_000, ge=0, description="Requests per model waiting for capacity; more fail."
    )
    route_policy: RoutePolicy = Field(
        default=RoutePolicy.LEAST_LOADED, description="least_loaded, round_robin or p2c."
    )
    sticky: bool = Field(default=True, description="Keep a task's turns on one replica.")
    retry_rounds: int = Field(
        default=1,
        ge=1,
        description=(
            "How many times over all replicas one request is tried before its last "
            "(retryable) error is raised to the caller."
        ),
    )
    retry_backoff_s: float = Field(
        default=0.05, ge=0, description="First pause between two rounds over all replicas."
    )
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health checks.")
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig, description="Per-client limits (off by default)."
    )
    warm_timeout_s: float = Field(
        default=60.0, gt=0, description="How long new replicas may take to pass health checks."
    )
    drain_timeout_s: float = Field(
        default=300.0, gt=0, description="How long old replicas may take to finish in-flight work."
    )
    seed: int = Field(default=0, description="Seed of the router's random choices (p2c).")
