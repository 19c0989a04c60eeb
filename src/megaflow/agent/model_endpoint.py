"""A task's model endpoint: for programs inside its sandbox (CLI agents), or on the host
(mini-swe-agent's litellm model, ``listen="tcp"``).

    async with TaskModelEndpoint(session) as endpoint:
        # endpoint.socket_path: a unix socket in the sandbox's host socket folder, seen
        #                       inside as endpoint.sandbox_socket (/run/megaflow/model.sock)
        # endpoint.api_key:     the task's key; a call without it gets 401; also in the
        #                       file endpoint.sandbox_key_file (read-only inside)
        ...                     # run the CLI agent in the sandbox
        endpoint.error          # what ended the task from the model side, if anything

    async with TaskModelEndpoint(session, listen="tcp") as endpoint:
        # endpoint.base_url:    http://127.0.0.1:<port>/v1, a loopback port of this task
        # endpoint.api_key:     the task's key (nothing is written to a file)

The endpoint is MegaFlow's OpenAI-compatible gateway (`megaflow.model.gateway`), served
on a unix socket instead of TCP, over a `ModelService` adapter (`SessionModelService`)
that answers each call through the task's `TaskSession.generate`: every turn is
recorded in the task's trajectory exactly as the built-in agent's are (token ids,
logprobs, model version, replica), and counts against its step and token budgets.

A sandbox has no network; its only way out is the socket the agent puts in the folder
the sandbox sees read-only as ``/run/megaflow`` (`Capabilities.host_sockets`). One
endpoint serves one task (its socket, its key) and is removed when the task ends. A
scaffold that runs on the host (mini-swe-agent) takes ``listen="tcp"``: a loopback port
of its own (any backend; only a caller with the task's random key is served).

The CLI sends its whole conversation on every call; the session wants what is new. When
a call extends the conversation the session holds (same messages, then more), only the
new messages are passed; a call that does not (the CLI compacted its history, or made a
side call) starts a new conversation in the session (`TaskSession.start_conversation`).
With ``record_observations``, the messages a continuing call adds after the model's last
answer (tool results, or user messages) are also noted as that turn's observations
(`TaskSession.observe`), as the built-in agent's are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from megaflow.agent.session import TaskOutcome, TaskSession
from megaflow.core.errors import CancelledTaskError, InvalidRequestError, MegaFlowError
from megaflow.env.sandbox import SOCKET_DIR
from megaflow.model.gateway import Gateway, GatewayConfig
from megaflow.v1 import common_pb2, model_pb2

__all__ = ["KEY_NAME", "SOCKET_NAME", "SessionModelService", "TaskModelEndpoint"]

SOCKET_NAME = "model.sock"
"""File name of a task's model socket in its sandbox's socket folder."""
KEY_NAME = "model.key"
"""File name of the task's key beside it (so that no command line carries the key)."""


def _args_key(arguments_json: str) -> str:
    """Tool call arguments in one canonical form (a CLI re-serialises what it got)."""
    try:
        return json.dumps(json.loads(arguments_json or "{}"), sort_keys=True)
    except ValueError:
        return arguments_json


def _message_key(message: common_pb2.ChatMessage) -> tuple[Any, ...]:
    """What must match for a message the CLI sends back to be the one recorded."""
    calls = tuple((c.name, _args_key(c.arguments_json)) for c in message.tool_calls)
    return (message.role, message.content.strip(), calls, message.tool_call_id)


class SessionModelService:
    """A `ModelService` for the gateway: each call is a turn of its task's session.

    `sessions` maps the task ids the gateway's keys stand for to their sessions. Calls
    of one task are answered one at a time, in order. A call the session refuses (its
    step or token budget is spent: `TaskOutcome`) or that fails for the platform (a
    `MegaFlowError`) is answered with an error and remembered in `error`, which also
    sets `failed`: the scaffold stops the CLI and ends the task with that error.
    `calls` counts the calls of each task that reached the service (through the
    gateway); `record_observations`: see the module doc.
    """

    def __init__(
        self,
        sessions: dict[str, TaskSession] | None = None,
        *,
        record_observations: bool = False,
    ) -> None:
        self.sessions: dict[str, TaskSession] = dict(sessions or {})
        self.record_observations = record_observations
        self.error: BaseException | None = None
        self.failed = asyncio.Event()
        self.calls: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._sent: dict[str, list[tuple[Any, ...]]] = {}  # task id -> its conversation

    def _session(self, task_id: str) -> TaskSession:
        session = self.sessions.get(task_id)
        if session is None:
            raise InvalidRequestError(f"no task {task_id!r} is served here")
        return session

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        session = self._session(request.task_id)
        self.calls[request.task_id] += 1
        if self.error is not None:
            raise CancelledTaskError(f"the task has ended: {self.error}")
        async with self._lock:
            try:
                return await self._turn(session, request)
            except TaskOutcome as outcome:
                self._fail(outcome)
                raise CancelledTaskError(f"the task has ended: {outcome}") from outcome
            except MegaFlowError as error:
                self._fail(error)
                raise

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.failed.set()

    async def _turn(
        self, session: TaskSession, request: model_pb2.GenerateRequest
    ) -> model_pb2.GenerateResponse:
        keys = [_message_key(m) for m in request.messages]
        sent = self._sent.get(request.task_id, [])
        if sent and keys[: len(sent)] == sent:
            new: Sequence[common_pb2.ChatMessage] = request.messages[len(sent) :]
            if self.record_observations:
                for message in new:
                    if message.role in ("tool", "user"):
                        session.observe(message)
        else:
            if sent:
                session.start_conversation()
            new = request.messages
        session.set_tools(request.tools, request.tool_choice)
        message = await session.generate(new)
        self._sent[request.task_id] = [*keys, _message_key(message)]
        turn = session.trajectory.turns[-1]
        return model_pb2.GenerateResponse(
            message=message,
            model=request.model or session.task.model,
            model_version=turn.model_version,
            prompt_tokens=turn.prompt_tokens,
            completion_tokens=turn.completion_tokens,
            finish_reason="tool_calls" if message.tool_calls else "stop",
            prompt_token_ids=turn.prompt_token_ids,
            completion_token_ids=turn.completion_token_ids,
            completion_logprobs=turn.completion_logprobs,
            replica=turn.replica,
        )

    async def list_models(
        self, request: model_pb2.ListModelsRequest
    ) -> model_pb2.ListModelsResponse:
        names = sorted({s.task.model for s in self.sessions.values()} - {""}) or ["default"]
        return model_pb2.ListModelsResponse(
            models=[model_pb2.ModelInfo(name=n, backend="megaflow-session") for n in names]
        )

    async def health(self, request: common_pb2.HealthRequest) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(ok=True, detail="task model endpoint")

    async def update_weights(
        self, request: model_pb2.UpdateWeightsRequest
    ) -> model_pb2.UpdateWeightsResponse:
        raise InvalidRequestError("a task's model endpoint does not update weights")

    async def list_replicas(
        self, request: model_pb2.ListReplicasRequest
    ) -> model_pb2.ListReplicasResponse:
        return model_pb2.ListReplicasResponse()


_ACCEPT_TURNS = 8
"""Loop turns a stopping endpoint waits for connections accepted just before it stopped."""


def _bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at `path`, however long the path (bound through
    /proc/self/fd so the 108-byte limit of socket addresses does not apply)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            sock.bind(f"/proc/self/fd/{folder}/{path.name}")
            _give_to_folder_owner(folder, path.name)
        finally:
            os.close(folder)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _close_after(request: web.Request, response: web.StreamResponse) -> None:
    # The header, so that the client closes its side too (aiohttp does not send it once
    # the response is being prepared).
    response.force_close()
    response.headers["Connection"] = "close"


def _bind_loopback() -> socket.socket:
    """A listening TCP socket on a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _give_to_folder_owner(folder: int, name: str) -> None:
    """Hand ``name`` to the owner of ``folder`` (a descriptor) when that is another user:
    a sandbox whose workload is an unprivileged uid owns its socket folder, and must be
    able to connect to the socket and read the key file put there for it."""
    st = os.fstat(folder)
    if st.st_uid != os.geteuid():
        os.chown(name, st.st_uid, st.st_gid, dir_fd=folder, follow_symlinks=False)


class TaskModelEndpoint:
    """The OpenAI-compatible endpoint of one task, on a unix socket in its sandbox's host
    socket folder, or on a loopback TCP port (see the module docstring)."""

    def __init__(
        self,
        session: TaskSession,
        *,
        config: GatewayConfig | None = None,
        name: str = SOCKET_NAME,
        listen: Literal["unix", "tcp"] = "unix",
        record_observations: bool = False,
    ) -> None:
        """`listen`: ``unix``, a socket in the sandbox's socket folder (for programs in
        the sandbox); ``tcp``, a free loopback port (for a scaffold on the host)."""
        if listen not in ("unix", "tcp"):
            raise InvalidRequestError(f"listen must be 'unix' or 'tcp', not {listen!r}")
        self.listen = listen
        if listen == "unix" and not session.host_socket_dir:
            raise InvalidRequestError(
                "this task's sandbox cannot take a socket from the agent (its backend does "
                "not declare the host_sockets capability): run CLI agents on a backend that "
                "does, such as local"
            )
        self.session = session
        self.service = SessionModelService(
            {session.task_id: session}, record_observations=record_observations
        )
        self.gateway = Gateway(
            self.service, config=config or GatewayConfig(require_key=True, max_recorded_tasks=1)
        )
        self.api_key = self.gateway.issue_key(session.task_id)
        folder = Path(session.host_socket_dir or ".")
        self.socket_path = folder / name
        self.sandbox_socket = f"{SOCKET_DIR}/{name}"
        self.key_path = folder / KEY_NAME
        self.sandbox_key_file = f"{SOCKET_DIR}/{KEY_NAME}"
        self.port = 0  # with listen="tcp", once started
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """With ``listen="tcp"``: what to give an OpenAI client (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def error(self) -> BaseException | None:
        """What ended the task from the model side (budget spent, model failure)."""
        return self.service.error

    @property
    def failed(self) -> asyncio.Event:
        """Set when `error` is."""
        return self.service.failed

    async def start(self) -> None:
        if self.listen == "unix":
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            folder = os.stat(self.key_path.parent)
            if folder.st_uid != os.geteuid():  # see _give_to_folder_owner
                os.fchown(fd, folder.st_uid, folder.st_gid)
            with os.fdopen(fd, "w") as f:
                f.write(self.api_key)
        app = self.gateway.app()
        if self.listen == "tcp":
            # One connection per call: a client's pool keeps no connection to this port
            # once the task is over (litellm caches its clients past the task).
            app.on_response_prepare.append(_close_after)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            if self.listen == "unix":
                site: web.BaseSite = web.SockSite(runner, _bind_unix(self.socket_path))
            else:
                site = web.SockSite(runner, _bind_loopback())
            await site.start()
            if self.listen == "tcp":
                self.port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            self._unlink()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving, close open connections and remove the socket file."""
        runner, self._runner = self._runner, None
        self._unlink()  # first: no new connection can reach the socket by its path
        try:
            if runner is not None:
                # Stop accepting, then let connections accepted just before (asyncio makes
                # their transports a few loop turns later) reach the server, so that the
                # cleanup closes them too instead of leaving them to the collector.
                for site in list(runner.sites):
                    await site.stop()
                for _ in range(_ACCEPT_TURNS):
                    await asyncio.sleep(0)
                await runner.cleanup()
        finally:
            self.gateway.revoke_key(self.api_key)
            self.gateway.pop_trajectory(self.session.task_id)  # the session has the record

    def _unlink(self) -> None:
        if self.listen != "unix":
            return
        for path in (self.socket_path, self.key_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def __aenter__(self) -> TaskModelEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
