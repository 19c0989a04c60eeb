"""Pull images from registries with skopeo (Debian's ``skopeo``) into OCI layouts.

    puller = Skopeo(PullOptions(insecure_registries=("127.0.0.1:5000",)))
    ref = RegistryRef.parse("docker.io/swebench/sweb.eval.x86_64.astropy_1776_astropy-12907")
    digest = await puller.resolve(ref, image)       # the linux/amd64 manifest's digest
    await puller.copy(ref, digest, layout, image)   # an OCI layout `oci.read_layout` reads

skopeo speaks the whole Registry API as ``docker pull`` does: token (bearer) and basic
authentication, HTTPS with TLS verification, parallel blob downloads, gzip and zstd
layers, every blob checked against its digest. ``resolve`` reads the manifest with
``skopeo inspect --raw`` and picks the platform itself (`oci.pick_platform`, as for
layouts on disk), so a cached image costs one manifest request; ``copy`` then fetches
exactly that manifest by digest.

Transport security: HTTPS with certificate verification, always, except for the hosts
(``HOST[:PORT]`` as written in the reference) listed in ``insecure_registries``, which
may answer over plain HTTP or with a certificate that does not verify (Docker's
``insecure-registries``). Credentials: ``auth_file`` (a containers-auth.json or Docker
``config.json``), else skopeo's own search: ``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
``~/.docker/config.json``. Extra CA certificates: ``cert_dir`` (``*.crt``), besides the
system's and ``/etc/containers/certs.d/HOST:PORT/``.

Every skopeo run has a timeout (skopeo's ``--command-timeout`` and ours, which kills its
process group). Failures name the image and end with skopeo's own words:
:class:`~megaflow.env.images.oci.ImageNotFoundError` (final) for an unknown repository,
tag or digest; :class:`RegistryAccessError` (final) when credentials are refused or
missing, TLS does not verify, or the registry speaks plain HTTP without the opt-in;
SandboxError (retryable) when the registry is unreachable, fails, or sends corrupt data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.core.subprocesses import run_program
from megaflow.env.images.digests import bytes_digest
from megaflow.env.images.oci import INDEX_TYPES, ImageNotFoundError, pick_platform

SKOPEO = "skopeo"
DEFAULT_HOST = "docker.io"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}\.)*{_LABEL}(?::\d{{1,5}})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF = re.compile(
    rf"(?:(?P<host>{_HOST})/)?(?P<repo>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>\w[\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
_FATAL_MSG = re.compile(r'level=fatal msg="(.*)"\s*$', re.S)


class RegistryAccessError(InvalidRequestError):
    """The registry refused access (credentials refused or missing), its certificate
    does not verify, or it speaks plain HTTP to a host not listed as insecure.
    Retrying will not help until the configuration changes."""


@dataclass(frozen=True)
class RegistryRef:
    """``[HOST[:PORT]/]REPOSITORY[:TAG][@sha256:...]``, Docker's reference syntax (no
    host: Docker Hub, where a one-part name is under ``library/``)."""

    host: str
    repository: str
    reference: str
    """The tag, or the digest when the reference pins one."""

    @classmethod
    def parse(cls, text: str, image: str) -> RegistryRef:
        match = _REF.fullmatch(text)
        if match is not None and match["host"] and not _is_host(match["host"]):
            if not re.fullmatch(_COMPONENT, match["host"]):  # a repository's first part
                match = None
        if match is None:
            raise InvalidRequestError(
                f"image {image}: {text!r} is not a registry reference "
                "([HOST[:PORT]/]REPOSITORY[:TAG][@sha256:HEX], lower-case repository)"
            )
        host, repo = match["host"], match["repo"]
        if host is None or not _is_host(host):
            # "swebench/x" is Docker Hub's swebench/x; "python" is library/python.
            repo = f"{host}/{repo}" if host else repo
            host = DEFAULT_HOST
            if "/" not in repo:
                repo = f"library/{repo}"
        return cls(host, repo, match["digest"] or match["tag"] or "latest")

    def docker(self, reference: str | None = None) -> str:
        """skopeo's ``docker://`` name, at ``reference`` (a digest) or its own."""
        ref = reference or self.reference
        return f"docker://{self.host}/{self.repository}{'@' if ':' in ref else ':'}{ref}"


def _is_host(first: str) -> bool:
    """Docker's rule: a reference's first part names a registry if it has a dot or a
    port, or is ``localhost``; else it is part of a Docker Hub repository name."""
    return "." in first or ":" in first or first == "localhost"


@dataclass(frozen=True)
class PullOptions:
    insecure_registries: Sequence[str] = ()
    auth_file: Path | None = None
    cert_dir: Path | None = None
    inspect_timeout_s: float = 60.0
    copy_timeout_s: float = 1800.0


class Skopeo:
    """Runs ``skopeo inspect`` and ``skopeo copy`` (stateless; safe to share)."""

    def __init__(self, options: PullOptions) -> None:
        self.options = options

    def _source_flags(self, ref: RegistryRef, prefix: str) -> list[str]:
        verify = ref.host not in self.options.insecure_registries
        flags = [f"--{prefix}tls-verify={'true' if verify else 'false'}"]
        if self.options.auth_file is not None:
            flags.append(f"--{prefix}authfile={self.options.auth_file}")
        if self.options.cert_dir is not None:
            flags.append(f"--{prefix}cert-dir={self.options.cert_dir}")
        return flags

    async def resolve(self, ref: RegistryRef, image: str) -> str:
        """The digest of the manifest to run: an index is resolved to its linux/amd64
        entry; a reference pinned by digest must match what the registry sends."""
        args = ["inspect", "--raw", "--no-tags", *self._source_flags(ref, ""), ref.docker()]
        raw = await self._run(args, ref, image, self.options.inspect_timeout_s)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SandboxError(f"image {image}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        digest = bytes_digest(raw)
        if ref.reference.startswith("sha256:") and digest != ref.reference:
            raise SandboxError(f"image {image}: manifest digest {digest} != {ref.reference}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise SandboxError(f"image {image}: the manifest is not JSON") from exc
        if not isinstance(body, dict):
            raise SandboxError(f"image {image}: the manifest is not a JSON object")
        if body.get("mediaType") in INDEX_TYPES or "manifests" in body:
            return str(pick_platform(body.get("manifests", []), image)["digest"])
        return digest

    async def copy(self, ref: RegistryRef, digest: str, layout: Path, image: str) -> None:
        """Fetch manifest ``digest`` of ``ref``'s repository into the OCI layout folder
        ``layout`` (created; skopeo's scratch files go next to it)."""
        scratch = layout.parent / "skopeo-tmp"
        await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
        args = [
            f"--tmpdir={scratch}",
            "copy",
            "--quiet",
            *self._source_flags(ref, "src-"),
            ref.docker(digest),
            f"oci:{layout}:image",
        ]
        await self._run(args, ref, image, self.options.copy_timeout_s)

    async def _run(self, args: list[str], ref: RegistryRef, image: str, timeout_s: float) -> bytes:
        binary = shutil.which(SKOPEO)
        if binary is None:
            raise SandboxError(
                f"image {image}: skopeo is not installed on this host (Debian: apt-get "
                "install skopeo; ./dev installs it)"
            )
        command = [binary, f"--command-timeout={max(1, int(timeout_s))}s", *self._global()]
        try:
            code, out, err = await run_program([*command, *args], timeout_s=timeout_s + 5)
        except TimeoutError as exc:
            raise SandboxError(
                f"image {image}: skopeo did not finish within {timeout_s} s"
            ) from exc
        if code != 0:
            raise classify(image, ref, err.decode(errors="replace"))
        return out

    def _global(self) -> list[str]:
        if any(p.is_file() for p in _policy_files()):
            return []
        # No signature policy on this host: without this skopeo would refuse every image.
        return ["--insecure-policy"]


def _policy_files() -> tuple[Path, ...]:
    return (Path.home() / ".config/containers/policy.json", Path("/etc/containers/policy.json"))


_NOT_FOUND = ("manifest unknown", "name unknown", "not found", "repository name not known")
_DENIED = (  # not "permission denied": that is this host's file system
    "unauthorized",
    "authentication required",
    "access to the resource is denied",
    "access denied",
    "invalid username",
    "incorrect username",
)
_TLS = ("x509:", "certificate", "tls:")
_UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "deadline exceeded",
    "timeout",
    "connection reset",
    "network is unreachable",
    "no route to host",
    "eof",
)


def classify(image: str, ref: RegistryRef, stderr: str) -> Exception:
    """The error a failed skopeo run means, with skopeo's message (its tail)."""
    match = _FATAL_MSG.search(stderr.strip())
    said = (match.group(1) if match else stderr.strip()).replace('\\"', '"')
    said = said if len(said) <= 600 else "..." + said[-600:]
    low = said.lower()
    host = ref.host
    if "server gave http response to https client" in low:
        return RegistryAccessError(
            f"image {image}: registry {host} speaks plain HTTP, refused unless listed in "
            f"insecure_registries: {said}"
        )
    if "did not match" in low or "digest mismatch" in low:
        return SandboxError(f"image {image}: layer digest mismatch: {said}")
    if any(word in low for word in _NOT_FOUND):
        return ImageNotFoundError(f"image {image} not found in registry {host}: {said}")
    if any(word in low for word in _DENIED):
        return RegistryAccessError(
            f"image {image}: registry {host} refused access (check the credentials in the "
            f"auth file; on Docker Hub this also means no such repository): {said}"
        )
    if any(word in low for word in _TLS):
        return RegistryAccessError(
            f"image {image}: TLS with registry {host} failed (add its CA to cert_dir, or "
            f"list it in insecure_registries): {said}"
        )
    if any(word in low for word in _UNREACHABLE):
        return SandboxError(f"image {image}: registry {host} unreachable: {said}")
    return SandboxError(f"image {image}: pull from {host} failed: {said}")
