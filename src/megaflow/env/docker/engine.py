"""A Docker daemon connection shared by sandboxes: the ``docker`` client, off the loop.

``docker.APIClient`` is synchronous; :meth:`DockerEngine.call` runs each request in a
thread of the engine's own pool and turns every daemon or transport failure into a
:class:`~megaflow.core.errors.SandboxError` (retryable: the platform failed).

Its own pool, not asyncio's default one: that one has ``min(32, cores + 4)`` threads
(6 on a 2-core host), shared with image extraction and file removal, so a few slow
extractions held up every container create, and at most that many requests were in
flight however large the connection pool. The engine's pool has as many threads as
connections (``max_pool_size``), so connections are the one limit.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import requests.exceptions  # type: ignore[import-untyped]

from megaflow.core.errors import InvalidRequestError, SandboxError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
"""Timeout of every Docker API request (the client's socket timeout)."""


class DockerEngine:
    """One Docker daemon (``unix:///path/docker.sock``) and a client pool for it.

    Arguments:

    - ``base_url``: the daemon's address, ``unix://`` (needed for attached shells).
    - ``timeout_s``: socket timeout of each API request.
    - ``max_pool_size``: connections kept to the daemon, and threads of the engine's
      own pool: requests in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_pool_size: int = 64,
    ) -> None:
        if not base_url.startswith("unix://"):
            raise InvalidRequestError(f"docker base_url must be unix://..., got {base_url!r}")
        self.base_url = base_url
        self.socket_path = base_url.removeprefix("unix://")
        self.timeout_s = timeout_s
        self._max_pool_size = max_pool_size
        self._api: docker.APIClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def api(self) -> docker.APIClient:
        """The low-level client (created on first use: it asks the daemon its version)."""
        with self._lock:
            if self._api is not None:
                return self._api
            try:
                self._api = docker.APIClient(
                    base_url=self.base_url,
                    version="auto",
                    timeout=int(max(1, self.timeout_s)),
                    max_pool_size=self._max_pool_size,
                )
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise SandboxError(
                    f"cannot reach the docker daemon at {self.base_url}: {exc}"
                ) from exc
            return self._api

    @property
    def api_version(self) -> str:
        return str(self.api.api_version)

    async def call(self, what: str, fn: Callable[[docker.APIClient], T]) -> T:
        """Run ``fn(api)`` in a thread; daemon failures -> SandboxError naming ``what``."""

        def run() -> T:
            return fn(self.api)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool(), run)
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(f"{what}: image not found: {_explain(exc)}") from exc
        except docker.errors.APIError as exc:
            raise SandboxError(f"{what}: docker daemon error: {_explain(exc)}") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise SandboxError(f"{what}: docker daemon unreachable: {exc}") from exc

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._max_pool_size, thread_name_prefix="megaflow-docker"
                )
            return self._executor

    def reachable(self) -> bool:
        """Whether the daemon's socket accepts a connection (a quick check, no request).

        Checked before calls that may meet a dead daemon: docker-py leaks the socket
        of a connection that fails.
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(self.socket_path)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the client's connections and let the pool's threads end (a request still
        running finishes; a later call starts a new pool)."""
        with self._lock:
            if self._api is not None:
                self._api.close()
                self._api = None
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)
