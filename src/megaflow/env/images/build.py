"""Build small images locally, without Docker: a busybox rootfs and tar layers.

    root = build_busybox_rootfs(Path("/tmp/img"))   # ~1 MiB busybox + the host's bash
    layer = tar_layer(root)                          # uncompressed tar, numeric owners
    image = build_oci_image([layer])                 # gzip layers, config, manifest
    write_oci_layout(Path("/tmp/layout"), image)     # an OCI image layout folder

Local sandboxes need ``bash`` (see :class:`~megaflow.env.local.LocalSandbox`), so the
busybox rootfs also gets the host's ``/usr/bin/bash`` with the shared libraries it
links (found with ``ldd``). Needs Debian's ``busybox-static`` (a dynamic busybox works
too: its libraries are copied as well). Blocking functions.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megaflow.core.errors import InvalidRequestError
from megaflow.env.images.digests import bytes_digest

BUSYBOX = Path("/bin/busybox")
_LDD_PATH = re.compile(r"(/\S+)")


def build_busybox_rootfs(dest: Path, *, with_bash: bool = True) -> Path:
    """Make a merged-/usr rootfs in ``dest`` (created; must not exist) and return it.

    ``usr/bin`` holds a static busybox and one symlink per applet; ``bin``, ``sbin``,
    ``lib`` and ``lib64`` link into ``usr``; ``etc`` holds passwd, group and hostname.
    """
    if not BUSYBOX.is_file():
        raise InvalidRequestError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    dest = Path(dest)
    dest.mkdir(parents=True)
    usr_bin = dest / "usr/bin"
    for folder in ("usr/bin", "usr/lib", "usr/lib64", "etc", "root", "tmp", "var/tmp"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib")):
        (dest / name).symlink_to(target)
    (dest / "lib64").symlink_to("usr/lib64")
    _copy_with_libraries(BUSYBOX, dest, as_name="usr/bin/busybox")  # static: no libraries
    listing = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True, timeout=10
    )
    for applet in listing.stdout.split():
        if applet not in ("busybox", "bash") and "/" not in applet:
            (usr_bin / applet).symlink_to("busybox")
    if with_bash:
        _copy_with_libraries(Path("/usr/bin/bash"), dest)
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    (dest / "etc/hostname").write_text("busybox\n")
    return dest


def _copy_with_libraries(binary: Path, dest: Path, as_name: str | None = None) -> None:
    """Copy ``binary`` (to ``as_name`` under ``dest``, else its own path) and the shared
    libraries ``ldd`` lists (none for a static binary) to their paths under ``dest``."""
    found = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=10)
    libraries = []
    for line in found.stdout.splitlines() if found.returncode == 0 else []:
        match = _LDD_PATH.search(line.split("=>")[-1])
        if match:
            libraries.append(Path(match.group(1)))
    for source, name in ((binary, as_name), *((lib, None) for lib in libraries)):
        rel = name or str(source).lstrip("/")
        # /lib, /lib64 and /bin are links into /usr on Debian 12: store under usr/.
        for top in ("lib64/", "lib/", "bin/"):
            if rel.startswith(top):
                rel = "usr/" + rel
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.resolve(), target)


def tar_layer(rootfs: Path) -> bytes:
    """An uncompressed tar of ``rootfs`` (relative paths, numeric root owner, sorted)."""
    buf = io.BytesIO()

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(rootfs)):
            tar.add(Path(rootfs) / entry, arcname=entry, recursive=True, filter=normalise)
    return buf.getvalue()


MEDIA_TYPES = {
    "docker": (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.container.image.v1+json",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ),
    "oci": (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ),
}
"""Manifest, config and layer media types of each manifest flavour."""


@dataclass(frozen=True)
class OciImage:
    """An image as bytes: gzip layers, config and manifest (digest = manifest's)."""

    layers: tuple[bytes, ...]
    config: bytes
    manifest: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return bytes_digest(self.manifest)


def build_oci_image(
    layers: Sequence[bytes], flavour: Literal["docker", "oci"] = "docker"
) -> OciImage:
    """Assemble an amd64 Linux image from uncompressed tar ``layers`` (lowest first)."""
    manifest_type, config_type, layer_type = MEDIA_TYPES[flavour]
    blobs = tuple(gzip.compress(layer, 6, mtime=0) for layer in layers)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [bytes_digest(x) for x in layers]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "size": len(config),
                "digest": bytes_digest(config),
            },
            "layers": [
                {"mediaType": layer_type, "size": len(b), "digest": bytes_digest(b)} for b in blobs
            ],
        },
        sort_keys=True,
    ).encode()
    return OciImage(blobs, config, manifest, manifest_type)


def write_oci_layout(dest: Path, image: OciImage, tag: str = "latest") -> Path:
    """Write ``image`` as an OCI image layout folder (``oci-layout``, ``index.json``,
    ``blobs/sha256/``) at ``dest`` (created) and return it."""
    blobs = Path(dest) / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (*image.layers, image.config, image.manifest):
        (blobs / bytes_digest(blob).split(":", 1)[1]).write_bytes(blob)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": image.media_type,
                "digest": image.digest,
                "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (Path(dest) / "index.json").write_text(json.dumps(index))
    (Path(dest) / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return Path(dest)
