"""Images for local sandboxes: references provisioned on demand into cached rootfs
folders.

    from megaflow.env.images import ImageStore, ImageStoreConfig, ImageNotFoundError

- `store`: `ImageStore`, the on-demand, single-flight, LRU-evicted cache (what the
  local backend uses) and the reference syntax (``dir:``, ``tar:``, ``oci:``,
  ``docker://``, ``registry:``);
- `skopeo`: registry pulls with skopeo into OCI layouts (TLS, credentials, zstd);
- `oci`: OCI image layouts and ``docker save`` archives on disk, and the platform an
  image index is resolved to;
- `extract`: applying layers (whiteouts included) safely into a rootfs;
- `digests`: the ``sha256:`` digests of bytes and files;
- `build`: small images built locally without Docker (tests, benchmarks).
"""

from megaflow.env.images.oci import ImageNotFoundError
from megaflow.env.images.skopeo import RegistryAccessError
from megaflow.env.images.store import Image, ImageStore, ImageStoreConfig

__all__ = ["Image", "ImageNotFoundError", "ImageStore", "ImageStoreConfig", "RegistryAccessError"]
