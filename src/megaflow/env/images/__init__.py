"""Images for local sandboxes: references provisioned on demand into cached rootfs
folders.

    from megaflow.env.images import ImageStore, ImageStoreConfig, ImageNotFoundError

- `store`: `ImageStore`, the on-demand, single-flight, LRU-evicted cache (what the
  local backend uses) and the reference syntax (``dir:``, ``tar:``, ``oci:``,
  ``registry:``);
- `registry`: a Registry HTTP API v2 client, and the platform an index is resolved to;
- `oci`: OCI image layouts and ``docker save`` archives on disk;
- `extract`: applying layers (whiteouts included) safely into a rootfs;
- `digests`: the ``sha256:`` digests of bytes and files;
- `build`: small images built locally without Docker (tests, benchmarks).
"""

from megaflow.env.images.registry import ImageNotFoundError
from megaflow.env.images.store import Image, ImageStore, ImageStoreConfig

__all__ = ["Image", "ImageNotFoundError", "ImageStore", "ImageStoreConfig"]
