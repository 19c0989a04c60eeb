"""What a `ReleaseEnvironmentRequest` names, the same for every Environment Service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from megaflow.core.errors import InvalidRequestError, NotFoundError
from megaflow.v1 import env_pb2


class Owned(Protocol):
    @property
    def owner(self) -> str: ...


def release_targets(
    request: env_pb2.ReleaseEnvironmentRequest, envs: Mapping[str, Owned]
) -> list[str]:
    """The env ids to release, of the live environments ``envs`` (by env id).

    By ``env_id``: that one (NotFoundError if unknown). By ``owner``: all of that
    owner's, possibly none (the create it wants undone may have failed before it held
    a sandbox). Exactly one of the two: InvalidRequestError otherwise.
    """
    if bool(request.env_id) == bool(request.owner):
        raise InvalidRequestError("ReleaseEnvironmentRequest needs exactly one of env_id, owner")
    if request.env_id:
        if request.env_id not in envs:
            raise NotFoundError(f"no environment {request.env_id!r}")
        return [request.env_id]
    return [env_id for env_id, env in envs.items() if env.owner == request.owner]
