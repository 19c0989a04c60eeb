"""Docker sandboxes: containers under runc or gVisor (runsc) with a persistent shell.

    from megaflow.env.docker import DockerEngine, DockerSandbox, reclaim_orphan_containers

See :class:`DockerSandbox` for the life of a sandbox, :class:`DockerEngine` for the
daemon connection sandboxes share, and :func:`reclaim_orphan_containers` for
cleaning up after a crashed owner.
"""

from megaflow.env.docker.engine import DockerEngine
from megaflow.env.docker.orphans import reclaim_orphan_containers
from megaflow.env.docker.sandbox import DockerSandbox
from megaflow.env.sandbox import CommandResult

__all__ = ["CommandResult", "DockerEngine", "DockerSandbox", "reclaim_orphan_containers"]
