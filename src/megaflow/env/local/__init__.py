"""Local sandboxes: bubblewrap isolation, cgroup limits and a persistent bash.

    from megaflow.env.local import LocalSandbox, CommandResult, cgroup_support, reclaim_orphans

See :class:`LocalSandbox` for the life of a sandbox (suspend/resume, put_files,
snapshot/restore, CPU share and workspace disk quota included), :func:`cgroup_support`
for the limits this machine can enforce, and :func:`reclaim_orphans` for cleaning up
after a crashed process. Images (rootfs folders for ``image_root``) come from
:class:`megaflow.env.images.ImageStore`.
"""

from megaflow.env.local.cgroups import CgroupSupport, cgroup_support
from megaflow.env.local.owner import reclaim_orphans
from megaflow.env.local.sandbox import LocalSandbox
from megaflow.env.sandbox import CommandResult

__all__ = ["CgroupSupport", "CommandResult", "LocalSandbox", "cgroup_support", "reclaim_orphans"]
