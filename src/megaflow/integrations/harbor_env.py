"""MegaFlow sandboxes as a Harbor environment (``harbor run --env harbor_env:MegaFlowEnvironment``).

Harbor (https://github.com/laude-institute/harbor, PyPI ``harbor``) runs an agent and a
task's verifier in an *environment*: a class implementing its ``BaseEnvironment``
(``start``, ``exec``, ``upload_file``/``upload_dir``, ``download_file``/``download_dir``,
``stop``), loaded by import path (``harbor run --env module:Class``). This one backs
each Harbor environment with one MegaFlow sandbox, reached over MegaFlow's OpenEnv
server (``megaflow serve openenv``, docs/openenv.md), one WebSocket session each:

- ``start`` opens a session and sends ``reset``: a fresh sandbox (claim).
- ``exec`` is a ``command`` step, run as ``bash -c`` in a subshell (the sandbox's
  persistent shell keeps no ``cd`` or variable of one exec for the next, as with
  ``docker exec``), from ``cwd`` (default: the task's ``workdir``, else the sandbox's),
  with ``env`` exported. Output is stdout and stderr together, in ``stdout``.
- uploads and downloads are tar archives, base64 in files under ``/tmp`` of the
  sandbox, moved with the ``write_file``/``read_file`` actions (binary-safe, any size:
  chunks of at most ``CHUNK_BYTES``) and packed or unpacked by ``tar`` in the sandbox.
- an ``exec`` that Harbor cancels (an agent past its timeout) sends a ``cancel``
  message: the server stops the command in the sandbox, so the next one (the
  verifier) runs at once, on a sandbox where the agent's command no longer runs.
- ``stop`` closes the session: the server releases the sandbox (and does so too when
  the socket drops, or this process dies and the sandbox's lease runs out).

Harbor 0.25 needs Python >= 3.12; MegaFlow runs on 3.11. So this module runs inside
Harbor's process and imports nothing of MegaFlow: only the standard library, Harbor,
and aiohttp (which Harbor installs, through litellm). Put this file's folder on
``PYTHONPATH`` (or copy the file) and name it ``harbor_env:MegaFlowEnvironment``;
``megaflow.integrations.harbor_env`` would import MegaFlow's whole package.

Options (``--ek key=value``): ``url`` (the OpenEnv server; default
``$MEGAFLOW_OPENENV_URL`` or ``http://127.0.0.1:8000``), ``image`` (a MegaFlow image
reference; default: ``docker://`` + the task's ``docker_image`` when it sets one, else
the server's ``--image``), ``max_exec_sec`` (the budget of an ``exec`` without a
timeout; default 3600, the Environment Service's largest). The sandbox has no network:
a task's ``network_mode = "no-network"`` is enforced, ``public`` is not available
(logged). Harbor's absolute paths (``/logs``, ``/tests``, ``/solution``, a task's
``workdir`` other than ``/workspace``) must be writable: start the server with
``--writable-dir`` for each (docs/harbor.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shlex
import tarfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from harbor.environments.base import BaseEnvironment, ExecResult  # type: ignore[import-not-found]
from harbor.environments.capabilities import (  # type: ignore[import-not-found]
    EnvironmentCapabilities,
)
from harbor.environments.tar_transfer import extract_dir  # type: ignore[import-not-found]
from harbor.models.task.config import NetworkMode  # type: ignore[import-not-found]
from harbor.models.trial.paths import EnvironmentPaths  # type: ignore[import-not-found]

__all__ = ["MegaFlowEnvironment"]

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK_BYTES = 6 * 1024 * 1024
"""Largest base64 piece per file action (the sandbox's file actions take 8 MiB)."""
SKIPPED_CONTEXT = ("Dockerfile", "docker-compose.yaml", "docker-compose.yml", ".dockerignore")
"""Build files of environment/ that are not copied into the workdir."""
MEGAFLOW_IMAGES = ("docker://", "registry:", "oci:", "dir:", "tar:")
"""Prefixes of MegaFlow image references, passed as they are (others get docker://)."""
REPLY_MARGIN_S = 60.0
"""How much longer than a command's budget to wait for the server's answer."""


class MegaFlowError(RuntimeError):
    """The MegaFlow server refused or failed an action (its error frame's message)."""


class MegaFlowEnvironment(BaseEnvironment):  # type: ignore[misc]
    """One MegaFlow sandbox per Harbor environment, over MegaFlow's OpenEnv WebSocket."""

    def __init__(
        self,
        *args: Any,
        url: str | None = None,
        image: str | None = None,
        max_exec_sec: float | str = 3600,
        **kwargs: Any,
    ) -> None:
        self._url = (url or os.environ.get("MEGAFLOW_OPENENV_URL") or DEFAULT_URL).rstrip("/")
        self._image_option = image
        self._max_exec_sec = float(max_exec_sec)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._lock = asyncio.Lock()
        self._unanswered = 0  # cancelled steps whose answer is still to come
        self._sandbox_workdir = "/workspace"
        super().__init__(*args, **kwargs)

    # -- what Harbor asks of an environment type ---------------------------------
    @staticmethod
    def type() -> str:
        return "megaflow"

    @property
    def capabilities(self) -> Any:
        # No network at all (a network namespace with only lo): no-network is enforced.
        return EnvironmentCapabilities(disable_internet=True)

    def _validate_definition(self) -> None:
        """MegaFlow builds no Dockerfile: the image is a MegaFlow image reference."""

    @property
    def _image(self) -> str | None:
        if self._image_option:
            return self._image_option
        docker_image: str | None = self.task_env_config.docker_image
        if docker_image:
            if docker_image == "host" or docker_image.startswith(MEGAFLOW_IMAGES):
                return docker_image
            return f"docker://{docker_image}"
        return None

    @property
    def _workdir(self) -> str:
        return self.task_env_config.workdir or self._sandbox_workdir

    # -- lifecycle ----------------------------------------------------------------
    async def start(self, force_build: bool) -> None:
        if self._network_policy.network_mode == NetworkMode.PUBLIC:
            self.logger.debug("MegaFlow sandboxes have no network: the task gets none")
        ws_url = self._url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        self._http = aiohttp.ClientSession()
        try:
            try:
                self._ws = await self._http.ws_connect(
                    f"{ws_url}/ws", heartbeat=20.0, max_msg_size=0, autoping=True
                )
            except aiohttp.ClientError as exc:
                raise MegaFlowError(
                    f"cannot reach MegaFlow's OpenEnv server at {self._url} (`megaflow serve "
                    f"openenv`; set --ek url=... or $MEGAFLOW_OPENENV_URL): {exc}"
                ) from exc
            task: dict[str, Any] = {"episode_id": self.session_id}
            if self._image:
                task["image"] = self._image
            reply = await self._call("reset", task, wait_s=600.0)
        except BaseException:
            await self._disconnect()
            raise
        self._sandbox_workdir = reply["observation"].get("cwd") or self._sandbox_workdir
        if self._workdir != self._sandbox_workdir:
            await self._checked(f"mkdir -p {shlex.quote(self._workdir)}", "create the workdir")
        # Harbor's output folders (/logs/agent, /logs/verifier, /logs/artifacts), as the
        # other remote environments make them.
        paths = EnvironmentPaths.for_os(self.os)
        await self.ensure_dirs(
            self._mount_targets(writable_only=True)
            or [paths.agent_dir, paths.verifier_dir, paths.artifacts_dir]
        )
        if self._enable_environment_dir_upload:
            await self._upload_build_context()

    async def _upload_build_context(self) -> None:
        """MegaFlow builds no Dockerfile; the build context's other files (environment/
        less Dockerfile and compose files) start the workdir, as ``COPY . /app`` does."""
        archive = await asyncio.to_thread(_pack_context, Path(self.environment_dir))
        if archive is not None:
            await self._untar(archive, self._workdir, "upload environment/")

    async def stop(self, delete: bool) -> None:
        """Close the session: the server releases the sandbox (``delete`` or not: a
        MegaFlow sandbox does not outlive its session)."""
        ws = self._ws
        if ws is not None and not ws.closed:
            try:
                async with self._lock:
                    await ws.send_json({"type": "close", "data": {}})
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                pass
        await self._disconnect()

    async def _disconnect(self) -> None:
        ws, http = self._ws, self._http
        self._ws = self._http = None
        if ws is not None:
            await ws.close()
        if http is not None:
            await http.close()

    # -- the wire protocol --------------------------------------------------------
    async def _call(
        self, kind: str, data: dict[str, Any], *, wait_s: float | None
    ) -> dict[str, Any]:
        """Send one message, wait for its answer (OpenEnv's ``observation`` frame's data)."""
        ws = self._ws
        if ws is None or ws.closed:
            raise MegaFlowError(f"{self.session_id}: no MegaFlow session (not started, or closed)")
        async with self._lock:
            await self._drain(ws)
            await ws.send_json({"type": kind, "data": data})
            try:
                message = await ws.receive(timeout=wait_s)
            except (asyncio.CancelledError, TimeoutError) as exc:
                # Harbor gave up on it (an agent's timeout cancels its exec), or no answer
                # came: stop the step in the sandbox; its answer is dropped later.
                self._unanswered += 1
                with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
                    await ws.send_json({"type": "cancel"})
                if isinstance(exc, TimeoutError):
                    raise MegaFlowError(
                        f"{self.session_id}: no answer from MegaFlow in {wait_s:g}s"
                    ) from exc
                raise
        if message.type != aiohttp.WSMsgType.TEXT:
            raise MegaFlowError(
                f"{self.session_id}: the MegaFlow session ended ({message.type.name}: "
                f"{message.extra or ws.close_code})"
            )
        frame = json.loads(message.data)
        if frame.get("type") == "error":
            error = frame.get("data") or {}
            raise MegaFlowError(
                f"MegaFlow: {error.get('message', 'error')} ({error.get('code', '?')})"
            )
        result: dict[str, Any] = frame.get("data") or {}
        return result

    async def _drain(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read (and drop) the answers of cancelled steps: the server answers each
        message once, in order, a cancelled step soon after the cancel."""
        while self._unanswered:
            message = await ws.receive(timeout=REPLY_MARGIN_S)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise MegaFlowError(f"{self.session_id}: the MegaFlow session ended")
            self._unanswered -= 1

    async def _step(self, action: dict[str, Any], wait_s: float | None) -> dict[str, Any]:
        observation: dict[str, Any] = (await self._call("step", action, wait_s=wait_s))[
            "observation"
        ]
        if observation.get("ok") is False:
            raise MegaFlowError(f"MegaFlow: {observation.get('message', 'action failed')}")
        return observation

    async def _checked(self, command: str, what: str) -> str:
        result = await self.exec(command, timeout_sec=600)
        if result.return_code != 0:
            raise MegaFlowError(
                f"cannot {what} (exit {result.return_code}): {(result.stdout or '')[-2000:]}"
            )
        return result.stdout or ""

    # -- exec ---------------------------------------------------------------------
    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_sec: int | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        """Run ``command`` with ``bash -c`` from ``cwd`` (default: the workdir), with
        ``env`` exported. ``user`` is not switched: a MegaFlow sandbox has one user."""
        merged = self._merge_env(env) or {}
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in merged.items())
        where = shlex.quote(cwd or self._workdir)
        line = f"( cd {where} && {exports}exec bash -c {shlex.quote(command)} ) </dev/null"
        budget = float(timeout_sec) if timeout_sec else self._max_exec_sec
        observation = await self._step(
            {"command": line, "timeout_s": budget}, wait_s=budget + REPLY_MARGIN_S
        )
        output = observation.get("output") or ""
        code = int(observation.get("exit_code", 1))
        if observation.get("timed_out"):
            code = 124  # as timeout(1)
            output += f"\n[megaflow: the command ran past its {budget:g}s budget]"
        callback = self._output_callback()
        if callback is not None and output:
            await callback(output, "stdout")
        return ExecResult(stdout=output, stderr="", return_code=code)

    # -- files: tar archives, base64 in /tmp of the sandbox ---------------------------
    async def _put_blob(self, data: bytes) -> str:
        """Write ``data`` into the sandbox as base64 pieces ``/tmp/.mf-<id>.NNNN``;
        the glob that names them, in order."""
        stem = f"/tmp/.mf-{uuid.uuid4().hex}"
        text = base64.b64encode(data)
        pieces = [text[i : i + CHUNK_BYTES] for i in range(0, len(text), CHUNK_BYTES)] or [b""]
        for number, piece in enumerate(pieces):
            await self._step(
                {"write_file": {"path": f"{stem}.{number:04d}", "content": piece.decode()}},
                wait_s=600.0,
            )
        return f"{stem}.*"

    async def _get_blob(self, command: str, what: str) -> bytes:
        """Run ``command`` (it writes bytes to stdout) in the sandbox, and read them back."""
        stem = f"/tmp/.mf-{uuid.uuid4().hex}"
        try:
            listing = await self._checked(
                f"set -o pipefail; {{ {command} ; }} | base64 -w0 | "
                f"split -b {CHUNK_BYTES} -d -a 4 - {stem}. && ls {stem}.*",
                what,
            )
            parts = sorted(p for p in listing.split() if p.startswith(f"{stem}."))
            text = b"".join(
                [
                    (await self._step({"read_file": p}, wait_s=600.0))["content"].encode()
                    for p in parts
                ]
            )
        finally:
            await self.exec(f"rm -f {stem}.*", timeout_sec=60)
        return base64.b64decode(text, validate=True)

    async def upload_file(self, source_path: Path | str, target_path: str) -> None:
        data = await asyncio.to_thread(Path(source_path).read_bytes)
        target = shlex.quote(target_path)
        blob = await self._put_blob(data)
        await self._checked(
            f'mkdir -p "$(dirname {target})" && cat {blob} | base64 -d > {target}; '
            f"r=$?; rm -f {blob}; exit $r",
            f"upload {source_path} to {target_path}",
        )

    async def upload_dir(self, source_dir: Path | str, target_dir: str) -> None:
        archive = await asyncio.to_thread(_pack_dir, Path(source_dir))
        await self._untar(archive, target_dir, f"upload {source_dir} to {target_dir}")

    async def _untar(self, archive: bytes, target_dir: str, what: str) -> None:
        blob = await self._put_blob(archive)
        target = shlex.quote(target_dir)
        await self._checked(
            f"mkdir -p {target} && cat {blob} | base64 -d | tar xzf - -C {target} "
            f"--no-same-owner; r=$?; rm -f {blob}; exit $r",
            what,
        )

    async def download_file(self, source_path: str, target_path: Path | str) -> None:
        data = await self._get_blob(f"cat {shlex.quote(source_path)}", f"download {source_path}")
        await asyncio.to_thread(_write, Path(target_path), data)

    async def download_dir(self, source_dir: str, target_dir: Path | str) -> None:
        data = await self._get_blob(
            f"tar czf - -C {shlex.quote(source_dir)} .", f"download {source_dir}"
        )
        await asyncio.to_thread(extract_dir, io.BytesIO(data), target_dir)


def _pack_dir(source: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname=".")
    return buffer.getvalue()


def _pack_context(context: Path) -> bytes | None:
    """environment/ less its build files, as a tar.gz (None: nothing to copy)."""
    if not context.is_dir():
        return None
    files = [
        p
        for p in sorted(context.rglob("*"))
        if p.is_file() and p.relative_to(context).parts[0] not in SKIPPED_CONTEXT
    ]
    if not files:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(context)))
    return buffer.getvalue()


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
