"""A Docker image, built offline, that runs the synthetic software-engineering tasks.

    with Dockerd() as daemon:
        build_python_image(daemon.client(), "megaflow-python:test")

The synthetic tasks (`megaflow.tasks.swe_synth`) need ``/bin/sh``, the usual shell
tools and ``python3`` with the standard library (``unittest``, ``json``). The image is
the busybox rootfs of `megaflow.env.images.build` (with bash) plus the host's Debian
``/usr/bin/python3.11``, the shared libraries ``ldd`` lists for it and for its extension
modules, and ``/usr/lib/python3.11`` without tests, IDLE, tkinter, ensurepip and
``__pycache__`` folders; ``docker import``ed like `megaflow.testing.dockerd`'s busybox
image. Blocking functions; needs Debian's ``python3.11`` and ``busybox-static``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import docker  # type: ignore[import-untyped]

from megaflow.env.images.build import _copy_with_libraries, build_busybox_rootfs, tar_layer

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
SKIPPED = ("test", "idlelib", "tkinter", "ensurepip", "__pycache__", "turtledemo")
SECURITY_TOOLS = (
    Path("/usr/bin/nohup"),
    Path("/usr/bin/curl"),
    Path("/usr/bin/getent"),
    Path("/usr/bin/strace"),
    Path("/usr/bin/setpriv"),
    Path("/usr/sbin/capsh"),
    Path("/usr/bin/ps"),
    Path("/usr/bin/mount"),
    Path("/usr/bin/umount"),
    Path("/usr/bin/hostname"),
    Path("/usr/bin/domainname"),
    Path("/usr/bin/grep"),
)
"""Host tools the containment battery (tests/security) runs that busybox lacks or
implements differently; ``tools=SECURITY_TOOLS`` adds them (those the host has). Busybox
sh runs its own applets before searching PATH, so call these by full path (or from bash)."""


def python_rootfs(dest: Path, tools: tuple[Path, ...] = ()) -> Path:
    """Make the image's root filesystem in ``dest`` (created; must not exist).

    Each of ``tools`` the host has is copied, with its libraries, to ``/usr/bin`` (over
    busybox's applet of that name)."""
    if not PYTHON.is_file() or not STDLIB.is_dir():
        raise RuntimeError(f"{PYTHON} or {STDLIB} is missing (Debian package python3.11)")
    root = build_busybox_rootfs(dest, with_bash=True)
    _copy_with_libraries(PYTHON, root)
    (root / "usr/bin/python3").symlink_to("python3.11")
    target = root / str(STDLIB).lstrip("/")
    shutil.copytree(STDLIB, target, symlinks=True, ignore=shutil.ignore_patterns(*SKIPPED))
    for module in sorted((STDLIB / "lib-dynload").glob("*.so")):
        # Copies the module again (harmless) and the libraries it links (libssl, libz, ...).
        _copy_with_libraries(module, root, as_name=str(module).lstrip("/"))
    for tool in tools:
        if tool.is_file():
            target = root / "usr/bin" / tool.name
            target.unlink(missing_ok=True)  # a busybox link: copying would follow it
            _copy_with_libraries(tool, root, as_name=f"usr/bin/{tool.name}")
    for folder in ("workspace", "proc", "sys", "dev"):
        (root / folder).mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)  # as in any distribution: a non-root user writes there
    return root


def build_python_image(
    client: docker.DockerClient | docker.APIClient, tag: str, tools: tuple[Path, ...] = ()
) -> str:
    """``docker import`` a busybox + python3 (+ ``tools``) root filesystem as ``tag``;
    returns its id."""
    api = client.api if isinstance(client, docker.DockerClient) else client
    repository, _, version = tag.rpartition(":") if ":" in tag else (tag, "", "latest")
    with tempfile.TemporaryDirectory(prefix="mf-python-image-") as tmp:
        layer = tar_layer(python_rootfs(Path(tmp) / "rootfs", tools))
    api.import_image_from_data(
        layer,
        repository=repository,
        tag=version,
        changes=['CMD ["/bin/sh"]', "ENV PATH=/usr/local/bin:/usr/bin:/bin:/sbin"],
    )
    return str(api.inspect_image(tag)["Id"])
