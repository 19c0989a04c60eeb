"""Labels that name a container's owner, and reclaiming containers of dead owners.

Every :class:`~megaflow.env.docker.DockerSandbox` container carries
``megaflow.owner_pid`` and ``megaflow.owner_start`` (the owner's pid and its start
time in clock ticks, which tells a reused pid apart) and ``megaflow.sandbox_id``. A
later process calls :func:`reclaim_orphan_containers` to remove the containers whose
owner is gone (an Environment Service does so when it starts).
"""

from __future__ import annotations

import os
from typing import Any

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

from megaflow.env.local import procs

LABEL_OWNER_PID = "megaflow.owner_pid"
LABEL_OWNER_START = "megaflow.owner_start"
LABEL_SANDBOX_ID = "megaflow.sandbox_id"


def owner_labels(sandbox_id: str) -> dict[str, str]:
    """The labels naming this process as the owner of sandbox ``sandbox_id``."""
    ticks = procs.start_ticks(os.getpid())
    return {
        LABEL_OWNER_PID: str(os.getpid()),
        LABEL_OWNER_START: "" if ticks is None else str(ticks),
        LABEL_SANDBOX_ID: sandbox_id,
    }


def owner_alive(labels: dict[str, str]) -> bool:
    """Whether the process named by a container's owner labels still runs."""
    try:
        pid = int(labels[LABEL_OWNER_PID])
    except (KeyError, ValueError):
        return False
    start = labels.get(LABEL_OWNER_START, "")
    return procs.alive(pid, int(start) if start.isdigit() else None)


def reclaim_orphan_containers(client: docker.DockerClient | docker.APIClient) -> int:
    """Force-remove every MegaFlow container whose owner process is gone.

    Returns how many were removed. Containers of live owners (this process included)
    are left alone. Blocking: call through ``asyncio.to_thread`` from async code.
    """
    api: docker.APIClient = client.api if isinstance(client, docker.DockerClient) else client
    found: list[dict[str, Any]] = api.containers(all=True, filters={"label": LABEL_OWNER_PID})
    removed = 0
    for container in found:
        if owner_alive(dict(container.get("Labels") or {})):
            continue
        try:
            api.remove_container(container["Id"], force=True)
        except docker.errors.NotFound:
            continue
        removed += 1
    return removed
