"""A real OCI registry for tests (Debian's ``docker-registry``) and push clients.

    async with LocalRegistry(tmp_path / "registry") as reg:       # 127.0.0.1:<free port>
        digest = await push_rootfs(reg.address, "tools/busybox", "v1", rootfs_dir)
        ...  # pull "docker://" + reg.address + "/tools/busybox:v1" (plain HTTP: insecure)

    secure = LocalRegistry(path, tls=True, users={"ann": "secret"})  # HTTPS + basic auth
    # secure.ca_dir: its CA (for --cert-dir); secure.write_auth_file(p, "ann", "secret")

:func:`push_image` builds an image without dockerd (gzip tar layers, a config and a
Docker schema 2 or OCI manifest) and uploads it over the Registry HTTP API v2 (blob
uploads, then the manifest) to a plain-HTTP registry; :func:`skopeo_push` copies an OCI
layout with skopeo (any registry, recompressing layers, e.g. to zstd). Every HTTP call
and subprocess has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import ssl
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import aiohttp

from megaflow.env.images.build import build_oci_image, tar_layer
from megaflow.env.images.digests import bytes_digest
from megaflow.testing.processes import spawn_logged, stop_group
from megaflow.testing.server import free_port

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTTP_TIMEOUT_S = 30.0

_CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""
_TLS = """  tls:
    certificate: {cert}
    key: {key}
"""
_AUTH = """auth:
  htpasswd:
    realm: megaflow-tests
    path: {path}
"""


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1 with filesystem storage under ``work_dir``.

    Plain HTTP and anonymous by default; ``tls=True`` serves HTTPS with a certificate
    of a CA made for it (``ca_dir`` holds ``ca.crt``), ``users`` (name -> password)
    requires basic authentication. Started by :meth:`start` (waits until ``GET /v2/``
    answers), stopped by PID with :meth:`stop` (SIGTERM, then SIGKILL). ``address`` is
    ``127.0.0.1:<port>``.
    """

    def __init__(
        self, work_dir: Path, *, tls: bool = False, users: dict[str, str] | None = None
    ) -> None:
        self.work_dir = Path(work_dir)
        self.storage = self.work_dir / "storage"
        self.port = 0
        self.tls = tls
        self.users = dict(users or {})
        self.ca_dir = self.work_dir / "ca"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.work_dir / "registry.log"

    @property
    def address(self) -> str:
        """``host:port`` to put in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, timeout_s: float = 20.0) -> LocalRegistry:
        """Start the registry and wait until it answers; RuntimeError if it does not."""
        self._launch()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        if not os.access(REGISTRY_BINARY, os.X_OK):
            raise RuntimeError(f"{REGISTRY_BINARY} missing: install Debian's docker-registry")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        text = _CONFIG.format(root=self.storage, port=self.port)
        if self.tls:
            cert, key = _make_certificates(self.work_dir / "tls", self.ca_dir)
            text += _TLS.format(cert=cert, key=key)
        if self.users:
            htpasswd = self.work_dir / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{_bcrypt(p)}\n" for u, p in self.users.items()))
            text += _AUTH.format(path=htpasswd)
        config = self.work_dir / "config.yml"
        config.write_text(text)
        argv = [REGISTRY_BINARY, "serve", str(config)]
        self._proc = spawn_logged(argv, self._log, stdin=subprocess.DEVNULL)

    async def _wait_ready(self) -> None:
        url = f"{'https' if self.tls else 'http'}://{self.address}/v2/"
        timeout = aiohttp.ClientTimeout(total=2.0)
        context = ssl.create_default_context(cafile=self.ca_dir / "ca.crt") if self.tls else None
        connector = aiohttp.TCPConnector(ssl=context) if context else None
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    log = self._log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"docker-registry exited ({self._proc.returncode}): {log}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status in (200, 401):  # 401: up, wants credentials
                            return
                await asyncio.sleep(0.05)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the registry, then SIGKILL its group after ``grace_s``."""
        proc, self._proc = self._proc, None
        stop_group(proc, grace_s)

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores a blob (tests corrupt it to check verification)."""
        algo, hexdigest = digest.split(":", 1)
        return self.storage / f"docker/registry/v2/blobs/{algo}/{hexdigest[:2]}/{hexdigest}/data"

    def write_auth_file(self, path: Path, user: str, password: str) -> Path:
        """A containers auth file (Docker's config.json format) with these credentials
        for this registry."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.address: {"auth": token}}}))
        return path

    async def __aenter__(self) -> LocalRegistry:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def push_image(
    address: str,
    repository: str,
    tag: str,
    layers: Sequence[bytes],
    *,
    flavour: Literal["docker", "oci"] = "docker",
    timeout_s: float = HTTP_TIMEOUT_S,
) -> str:
    """Upload an image made of uncompressed tar ``layers`` (gzipped here); return the
    manifest digest. ``address`` is ``host:port`` of a plain-HTTP registry."""
    image = await asyncio.to_thread(build_oci_image, layers, flavour)
    base = f"http://{address}/v2/{repository}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for blob in (image.config, *image.layers):
            await _upload_blob(session, base, address, blob)
        headers = {"Content-Type": image.media_type}
        async with session.put(
            f"{base}/manifests/{tag}", data=image.manifest, headers=headers
        ) as r:
            if r.status != 201:
                raise RuntimeError(f"manifest PUT {repository}:{tag}: {r.status} {await r.text()}")
    return image.digest


async def _upload_blob(
    session: aiohttp.ClientSession, base: str, address: str, blob: bytes
) -> None:
    digest = bytes_digest(blob)
    async with session.head(f"{base}/blobs/{digest}") as r:
        if r.status == 200:
            return
    async with session.post(f"{base}/blobs/uploads/") as r:
        if r.status != 202:
            raise RuntimeError(f"blob upload start: {r.status} {await r.text()}")
        location = r.headers["Location"]
    if location.startswith("/"):
        location = f"http://{address}{location}"
    sep = "&" if "?" in location else "?"
    headers = {"Content-Type": "application/octet-stream"}
    url = f"{location}{sep}digest={digest}"
    async with session.put(url, data=io.BytesIO(blob), headers=headers) as r:
        if r.status != 201:
            raise RuntimeError(f"blob upload {digest}: {r.status} {await r.text()}")


async def push_rootfs(
    address: str,
    repository: str,
    tag: str,
    rootfs: Path,
    *,
    flavour: Literal["docker", "oci"] = "docker",
) -> str:
    """Push the folder ``rootfs`` as a one-layer image; return the manifest digest."""
    layer = await asyncio.to_thread(tar_layer, rootfs)
    return await push_image(address, repository, tag, [layer], flavour=flavour)


def _bcrypt(password: str) -> str:
    """A bcrypt hash (what docker-registry's htpasswd reads), with glibc's crypt; the
    lowest cost (the registry checks it on every request)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def _make_certificates(folder: Path, ca_dir: Path) -> tuple[Path, Path]:
    """A CA (``ca_dir/ca.crt``) and a certificate it signs for 127.0.0.1 (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", ca_dir / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=megaflow test CA", "-keyout", ca_key, "-out", ca_crt],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-extfile", ext, "-out", crt],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
    return crt, key


def skopeo_push(
    layout: Path,
    destination: str,
    *,
    compress: str | None = None,
    tls_verify: bool = False,
    auth_file: Path | None = None,
    cert_dir: Path | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Copy the image of OCI layout ``layout`` (tag ``latest``) to ``destination``
    (``HOST:PORT/REPO:TAG``) with skopeo; ``compress``: ``gzip`` or ``zstd`` layers.
    Blocking; RuntimeError with skopeo's message if it fails."""
    args = ["skopeo", "copy", "--quiet", f"--dest-tls-verify={str(tls_verify).lower()}"]
    if compress:
        args.append(f"--dest-compress-format={compress}")
    if auth_file:
        args.append(f"--dest-authfile={auth_file}")
    if cert_dir:
        args.append(f"--dest-cert-dir={cert_dir}")
    args += [f"oci:{layout}:latest", f"docker://{destination}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"skopeo copy to {destination} failed: {done.stderr[-1000:]}")
