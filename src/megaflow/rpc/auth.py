"""Who may call a MegaFlow service: a shared token, mutual TLS, or loopback only.

A service binds to loopback by default. A bind to any other address needs a shared
token, or mutual TLS, or both (or an explicit `insecure=True`, `--insecure`): anything
else is refused at start with an error that says so.

- Token: every client sends `authorization: Bearer <token>` as call metadata; a server
  interceptor checks it on every RPC (constant-time compare) and answers a missing or
  wrong one with UNAUTHENTICATED, naming what is wrong. On a plain channel the token
  crosses the network in clear: use it with TLS beyond one trusted network.
- Mutual TLS: grpcio's own credentials. The server presents `cert`/`key` and requires a
  client certificate signed by `ca`; clients present the same kind of pair and verify
  the server against `ca` (the name checked is the address's host, or `server_name`).

`RpcSecurity` holds one process's settings. The process default (`current()`) comes
from `configure()` (the CLI's `--auth-token-file`, `--tls-*` options) or else from the
environment: `MEGAFLOW_AUTH_TOKEN` or `MEGAFLOW_AUTH_TOKEN_FILE`, `MEGAFLOW_TLS_CERT`,
`MEGAFLOW_TLS_KEY`, `MEGAFLOW_TLS_CA`, `MEGAFLOW_TLS_SERVER_NAME`. Every gRPC server
and client built without explicit settings uses it, so each service-to-service call
(registration, heartbeats, scheduler -> agent, agent -> env and model, the CLI and
`megaflow.connect`) carries the same credentials.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from megaflow.core.errors import InvalidRequestError

TOKEN_METADATA_KEY = "authorization"
_BEARER = "Bearer "
AUTH_ERROR_CLASS = "AuthenticationError"
ENV_TOKEN = "MEGAFLOW_AUTH_TOKEN"
ENV_TOKEN_FILE = "MEGAFLOW_AUTH_TOKEN_FILE"
ENV_TLS_CERT = "MEGAFLOW_TLS_CERT"
ENV_TLS_KEY = "MEGAFLOW_TLS_KEY"
ENV_TLS_CA = "MEGAFLOW_TLS_CA"
ENV_TLS_SERVER_NAME = "MEGAFLOW_TLS_SERVER_NAME"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class RpcSecurity:
    """One process's credentials (all empty: plain gRPC, loopback binds only)."""

    token: str = ""
    tls_cert: bytes = b""  # PEM chain this side presents
    tls_key: bytes = b""  # its PEM private key
    tls_ca: bytes = b""  # PEM roots the other side's certificate must chain to
    tls_server_name: str = ""  # the name a client checks in the server's certificate
    insecure: bool = False  # allow a non-loopback bind without token or TLS

    def __post_init__(self) -> None:
        if self.token and (len(self.token) < MIN_TOKEN_CHARS or self.token != self.token.strip()):
            raise InvalidRequestError(
                f"the auth token must have at least {MIN_TOKEN_CHARS} characters and no "
                "surrounding whitespace (e.g. `openssl rand -hex 32`)"
            )
        if self.token and not self.token.isprintable():
            raise InvalidRequestError("the auth token must be printable ASCII")
        parts = (bool(self.tls_cert), bool(self.tls_key), bool(self.tls_ca))
        if any(parts) and not all(parts):
            raise InvalidRequestError(
                "mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def authenticated(self) -> bool:
        """Whether callers must prove who they are (token or client certificate)."""
        return bool(self.token) or self.tls

    def describe(self) -> str:
        parts = (["token"] if self.token else []) + (["mutual TLS"] if self.tls else [])
        return " + ".join(parts) or "none"

    # -- client side ----------------------------------------------------------------

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The metadata every call carries (None: nothing to add)."""
        return ((TOKEN_METADATA_KEY, _BEARER + self.token),) if self.token else None

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """An aio channel to `address`: TLS with this side's certificate when set."""
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca,
            private_key=self.tls_key,
            certificate_chain=self.tls_cert,
        )
        if self.tls_server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.tls_server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    # -- server side ----------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_ca,
            require_client_auth=True,
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []

    def check_bind(self, listen: str) -> None:
        """Refuse a non-loopback `listen` address unless callers must authenticate (or
        `insecure` says otherwise)."""
        host = listen.rsplit(":", 1)[0]
        if is_loopback(host) or self.authenticated or self.insecure:
            return
        raise InvalidRequestError(
            f"refusing to listen on {listen} without authentication: any host that can "
            "reach it could run tasks and commands. Bind to loopback (127.0.0.1), or give "
            "a shared token (--auth-token-file PATH or $MEGAFLOW_AUTH_TOKEN) or mutual "
            "TLS (--tls-cert, --tls-key, --tls-ca); --insecure allows it anyway"
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP literal, maybe in brackets, or a name) is a loopback one.
    The empty host, 0.0.0.0 / [::] and any other name are not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_secret(path: Path, what: str) -> bytes:
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as error:
        raise InvalidRequestError(f"cannot read the {what} {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidRequestError(
            f"the {what} {path} is readable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}): chmod 600 it"
        )
    return data


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidRequestError(f"cannot read the {what} {path}: {error.strerror}") from None


def load(
    *,
    token_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
    tls_server_name: str | None = None,
    insecure: bool = False,
    environ: Mapping[str, str] | None = None,
) -> RpcSecurity:
    """Settings from files, each defaulting to its environment variable (module doc).
    InvalidRequestError says what is wrong (unreadable file, a secret readable by
    others, a short token, an incomplete TLS triple)."""
    env = os.environ if environ is None else environ
    token = ""
    if token_file is None and env.get(ENV_TOKEN_FILE):
        token_file = Path(env[ENV_TOKEN_FILE])
    if token_file is not None:
        token = _read_secret(token_file, "auth token file").decode(errors="replace").strip()
        if not token:
            raise InvalidRequestError(f"the auth token file {token_file} is empty")
    elif env.get(ENV_TOKEN):
        token = env[ENV_TOKEN].strip()

    def path(value: Path | None, name: str) -> Path | None:
        return value if value is not None else (Path(env[name]) if env.get(name) else None)

    cert, key, ca = (
        path(tls_cert, ENV_TLS_CERT),
        path(tls_key, ENV_TLS_KEY),
        path(tls_ca, ENV_TLS_CA),
    )
    return RpcSecurity(
        token=token,
        tls_cert=_read(cert, "TLS certificate") if cert else b"",
        tls_key=_read_secret(key, "TLS key") if key else b"",
        tls_ca=_read(ca, "TLS CA certificate") if ca else b"",
        tls_server_name=tls_server_name or env.get(ENV_TLS_SERVER_NAME, ""),
        insecure=insecure,
    )


_current: RpcSecurity | None = None


def configure(security: RpcSecurity | None) -> None:
    """Set this process's default (None: the environment's, read at each use)."""
    global _current
    _current = security


def current() -> RpcSecurity:
    """This process's default settings: from `configure`, else from the environment as
    it is now (read each time a server or client is built, never cached)."""
    return _current if _current is not None else load()


Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers every call that lacks the shared token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = (_BEARER + token).encode()

    def _problem(self, metadata: Any) -> str | None:
        values = [v for k, v in metadata or () if k == TOKEN_METADATA_KEY]
        if not values:
            return (
                "this MegaFlow service requires an auth token and the call carried none: "
                "give the client the deployment's token (--auth-token-file PATH or "
                f"${ENV_TOKEN})"
            )
        given = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        if len(values) > 1 or not hmac.compare_digest(given, self._expected):
            return (
                "the call's auth token is wrong (not this deployment's token): check the "
                f"client's --auth-token-file / ${ENV_TOKEN}"
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        problem = self._problem(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        return _deny(problem)


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        context.set_trailing_metadata((("megaflow-error", AUTH_ERROR_CLASS),))
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{AUTH_ERROR_CLASS}: {message}")

    # no deserializer: the request's bytes are not even decoded
    return grpc.unary_unary_rpc_method_handler(refuse)
