"""An OpenEnv-compatible environment server backed by MegaFlow sandboxes.

OpenEnv (https://github.com/huggingface/OpenEnv, PyPI ``openenv``) clients talk to an
environment server over one WebSocket per session (``/ws``: ``reset``, ``step``,
``state`` and ``close`` messages, answered by ``observation``, ``state`` or ``error``
frames) and over stateless HTTP (``POST /reset``, ``POST /step``, ``GET /state``,
``GET /health``, ``/schema``, ``/metadata``). This module speaks that wire protocol
with aiohttp, and backs every session with one environment of an Environment
Service: the in-process `SandboxEnvironmentService` or a remote one through
`EnvironmentServiceClient`.

- ``reset`` (its data: an optional task: ``image``, ``files``, ``hidden_files``,
  ``eval_command``, ``setup_commands``) releases the session's environment, if any,
  and creates a fresh one.
- ``step`` runs one `SandboxAction`: a shell command (``ExecuteStep``), a file action
  or ``submit`` (``SubmitAction``: the hidden tests' reward, and ``done``).
- ``state`` is the environment's ``GetObservation`` (cwd, last output, steps).
- The environment is released when the WebSocket closes (``close`` message, client
  gone, keepalive lost), when the session is idle past ``idle_timeout_s`` (it is then
  told so in an error frame and the socket is closed), and when the server stops.

OpenEnv's own server (FastAPI) is not used: it runs ``state`` as a synchronous
property on its event loop (no sandbox call possible), reaps sessions by idleness (when
a timeout is set) even while their WebSocket is open, and would make gradio and fastmcp
runtime dependencies.
Long pauses between steps keep the session: the server answers the client's
keepalive pings while a step runs, pings it too (``ws_heartbeat_s``), and renews the
environment's lease with ``Heartbeat`` while the session waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import uuid
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megaflow.contract import EnvironmentService
from megaflow.core.errors import (
    CapacityError,
    InvalidRequestError,
    MegaFlowError,
    NotFoundError,
    SandboxError,
)
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.v1 import env_pb2

__all__ = [
    "OpenEnvConfig",
    "OpenEnvServer",
    "ResetTask",
    "SandboxAction",
    "serve",
]

log = logging.getLogger(__name__)


class OpenEnvConfig(BaseModel):
    """Settings of the OpenEnv server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(default="host", description="Image of a session whose reset names none.")
    max_sessions: int = Field(default=256, ge=1, description="WebSocket sessions at once.")
    idle_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A session with no message for this long is released and its socket closed.",
    )
    lease_s: float = Field(
        default=120.0,
        gt=0,
        description="Lease of each environment; renewed (Heartbeat) every lease_s/3 while the "
        "session lives, so the Environment Service reaps it if this server dies.",
    )
    ws_heartbeat_s: float = Field(
        default=20.0, gt=0, description="Server-side WebSocket ping interval (keepalive)."
    )
    setup_timeout_s: float = Field(
        default=0.0, ge=0, description="Budget of an environment's creation (0: the service's)."
    )
    max_message_mib: int = Field(default=100, ge=1, description="Largest WebSocket message.")


class ResetTask(BaseModel):
    """What ``reset`` accepts (all optional): OpenEnv's ``seed`` and ``episode_id``, and
    the task whose environment the session gets."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = None
    episode_id: str | None = None
    image: str | None = Field(default=None, description="Default: the server's --image.")
    files: dict[str, str] = Field(default_factory=dict, description="Workspace files (text).")
    hidden_files: dict[str, str] = Field(
        default_factory=dict, description="Copied in at submit only (the hidden tests)."
    )
    eval_command: str = Field(default="", description="Run at submit; exit 0 is reward 1.")
    setup_commands: list[str] = Field(default_factory=list)


class FileWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    content: str


class FileEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    old: str
    new: str


class SandboxAction(BaseModel):
    """One step: exactly one of ``command``, ``read_file``, ``write_file``, ``edit_file``
    and ``submit``."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(default=None, description="A shell command (persistent shell).")
    timeout_s: float = Field(default=0.0, ge=0, description="Its budget (0: the service's).")
    read_file: str | None = Field(default=None, description="A path to read.")
    write_file: FileWrite | None = None
    edit_file: FileEdit | None = None
    submit: bool = Field(default=False, description="Run the hidden tests; ends the episode.")
    scoring_timeout_s: float = Field(default=0.0, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_action(self) -> SandboxAction:
        chosen = [
            self.command is not None,
            self.read_file is not None,
            self.write_file is not None,
            self.edit_file is not None,
            self.submit,
        ]
        if sum(chosen) != 1:
            raise ValueError(
                "an action is exactly one of command, read_file, write_file, edit_file, submit"
            )
        return self


def _result(
    observation: dict[str, Any],
    *,
    reward: float | None = None,
    done: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """OpenEnv's serialized observation: observation, reward, done (and metadata)."""
    result: dict[str, Any] = {"observation": observation, "reward": reward, "done": done}
    if metadata:
        result["metadata"] = metadata
    return result


class Session:
    """One OpenEnv session: at most one environment of the Environment Service."""

    def __init__(self, server: OpenEnvServer, ws: web.WebSocketResponse | None = None) -> None:
        self.server = server
        self.session_id = uuid.uuid4().hex
        self.owner = f"openenv-{self.session_id}"
        self.ws = ws
        self.env_id = ""
        self.workdir = ""
        self.image = ""
        self.episode_id: str | None = None
        self.steps = 0
        self.done = False
        self.busy = 0
        self.closed = False
        self.current: asyncio.Task[dict[str, Any] | None] | None = None
        """The message being answered (a ``cancel`` message cancels it)."""
        self.last_used = time.monotonic()
        self.renewed = self.last_used

    @property
    def env(self) -> EnvironmentService:
        return self.server.env

    def touch(self) -> None:
        self.last_used = self.renewed = time.monotonic()

    async def reset(self, data: dict[str, Any]) -> dict[str, Any]:
        task = ResetTask.model_validate(data)
        await self.release()
        config = self.server.config
        self.image = task.image or config.image
        response = await self.env.create_environment(
            env_pb2.CreateEnvironmentRequest(
                owner=self.owner,
                image=self.image,
                files={p: c.encode() for p, c in task.files.items()},
                hidden_files={p: c.encode() for p, c in task.hidden_files.items()},
                eval_command=task.eval_command,
                setup_commands=task.setup_commands,
                setup_timeout_s=config.setup_timeout_s,
                lease_s=config.lease_s,
            )
        )
        if self.closed:  # closed while it was created: give it back at once
            await self.release()
            raise InvalidRequestError("the session was closed")
        self.env_id, self.workdir = response.env_id, response.workdir
        self.episode_id = task.episode_id or uuid.uuid4().hex
        self.steps, self.done = 0, False
        return _result(
            {"output": "", "exit_code": 0, "cwd": self.workdir},
            metadata={"env_id": self.env_id, "episode_id": self.episode_id},
        )

    async def step(self, data: dict[str, Any]) -> dict[str, Any]:
        action = SandboxAction.model_validate(data)
        if not self.env_id:  # never a silent fresh sandbox: the agent's state would be gone
            idle = self.server.config.idle_timeout_s
            raise InvalidRequestError(
                "this session has no environment: send reset first (a session idle for "
                f"{idle:g}s, or whose socket closed, loses its environment)"
            )
        env_id = self.env_id
        self.steps += 1
        if action.command is not None:
            out = await self.env.execute_step(
                env_pb2.ExecuteStepRequest(
                    env_id=env_id, command=action.command, timeout_s=action.timeout_s
                )
            )
            return _result(
                {
                    "output": out.output,
                    "exit_code": out.exit_code,
                    "timed_out": out.timed_out,
                    "truncated": out.truncated,
                    "duration_s": out.duration_s,
                },
                done=self.done,
            )
        request = env_pb2.SubmitActionRequest(env_id=env_id)
        if action.read_file is not None:
            request.read_file.path = action.read_file
        elif action.write_file is not None:
            request.write_file.path = action.write_file.path
            request.write_file.content = action.write_file.content.encode()
        elif action.edit_file is not None:
            edit = action.edit_file
            request.edit_file.CopyFrom(env_pb2.EditFile(path=edit.path, old=edit.old, new=edit.new))
        else:
            request.submit.scoring_timeout_s = action.scoring_timeout_s
        reply = await self.env.submit_action(request)
        observation: dict[str, Any] = {"ok": reply.ok, "message": reply.message}
        if action.read_file is not None:
            observation["content"] = reply.content.decode(errors="replace")
        reward = None
        if action.submit:
            self.done = True
            observation["eval_output"] = reply.eval_output
            observation["tests"] = [
                {"test_id": t.test_id, "status": t.status, "group": t.group} for t in reply.tests
            ]
            reward = reply.reward if reply.has_reward else None
        return _result(observation, reward=reward, done=self.done)

    async def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"episode_id": self.episode_id, "step_count": self.steps}
        if not self.env_id:
            return state
        obs = await self.env.get_observation(env_pb2.GetObservationRequest(env_id=self.env_id))
        state.update(
            env_id=self.env_id,
            image=self.image,
            workdir=self.workdir,
            cwd=obs.cwd,
            last_output=obs.last_output,
            alive=obs.alive,
            done=self.done,
        )
        return state

    async def renew(self) -> None:
        """Heartbeat the environment's lease (the session waits; its sandbox stays)."""
        if not self.env_id:
            return
        self.renewed = time.monotonic()
        try:
            await self.env.heartbeat(
                env_pb2.EnvHeartbeatRequest(env_id=self.env_id, lease_s=self.server.config.lease_s)
            )
        except NotFoundError:  # reaped or died: the next step says so, and to reset
            self.env_id = ""
            raise

    async def release(self) -> None:
        """Give the environment back (by owner: also one whose create is in flight)."""
        self.env_id = ""
        with contextlib.suppress(NotFoundError):
            await self.env.release_environment(env_pb2.ReleaseEnvironmentRequest(owner=self.owner))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.sessions.pop(self.session_id, None)
        try:
            await asyncio.shield(self.release())
        except Exception as exc:  # the lease reaper gets it if this fails
            log.warning("cannot release the environment of session %s: %s", self.session_id, exc)


def _is_cancel(raw: str) -> bool:
    """A ``{"type": "cancel"}`` message: MegaFlow's extension of OpenEnv's protocol that
    stops the step being answered (it is answered with a ``CANCELLED`` error frame; a
    cancel with nothing in flight is ignored, and never answered)."""
    try:
        message = json.loads(raw)
    except json.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "cancel"


def _error(message: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "data": {"message": message, "code": code, **extra}}


class OpenEnvServer:
    """The OpenEnv wire protocol over aiohttp, one environment per session.
    Use as ``async with OpenEnvServer(env_service, host=..., port=...) as server``."""

    def __init__(
        self,
        env: EnvironmentService,
        config: OpenEnvConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.env = env
        self.config = config or OpenEnvConfig()
        self.host, self.port = host, port
        self.sessions: dict[str, Session] = {}
        self._runner: web.AppRunner | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_message_mib * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metadata", self._metadata)
        app.router.add_get("/schema", self._schema)
        app.router.add_get("/capacity", self._capacity)
        app.router.add_get("/state", self._http_state)
        app.router.add_post("/reset", self._http_reset)
        app.router.add_post("/step", self._http_step)
        app.router.add_get("/ws", self._ws)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        sockets = [a for a in runner.addresses if isinstance(a, tuple)]
        if sockets:
            self.port = int(sockets[0][1])
        self._upkeep = asyncio.create_task(self._keep_up())

    async def stop(self) -> None:
        """Close every session (releasing its environment), then stop listening."""
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        sessions = list(self.sessions.values())
        sockets = [s.ws.close(code=1001, message=b"server stopping") for s in sessions if s.ws]
        await asyncio.gather(*sockets, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpenEnvServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- upkeep: leases and idle sessions -----------------------------------------
    async def _keep_up(self) -> None:
        config = self.config
        interval = min(config.lease_s / 3, config.idle_timeout_s / 2, 10.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            calls = []
            for session in list(self.sessions.values()):
                if session.busy:
                    continue
                if now - session.last_used > config.idle_timeout_s:
                    calls.append(self._expire(session))
                elif now - session.renewed > config.lease_s / 3:
                    calls.append(session.renew())
            for outcome in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.warning("session upkeep: %s", outcome)

    async def _expire(self, session: Session) -> None:
        idle = self.config.idle_timeout_s
        log.info("session %s idle for %.0fs: released", session.session_id, idle)
        await session.close()
        ws = session.ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                message = f"session idle for more than {idle:g}s; its environment was released"
                await ws.send_json(_error(message, "SESSION_ERROR"))
                await ws.close(code=4000, message=b"idle timeout")

    # -- HTTP --------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def _capacity(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"active_sessions": len(self.sessions), "max_sessions": self.config.max_sessions}
        )

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "megaflow",
                "description": "MegaFlow sandboxes: shell commands, file actions and hidden-test "
                "rewards, one sandbox per session.",
                "version": "1",
            }
        )

    async def _schema(self, request: web.Request) -> web.Response:
        observation = {"type": "object", "additionalProperties": True}
        return web.json_response(
            {
                "action": SandboxAction.model_json_schema(),
                "observation": observation,
                "reset_observation": observation,
                "state": {"type": "object", "additionalProperties": True},
            }
        )

    async def _http_state(self, request: web.Request) -> web.Response:
        # As OpenEnv's HTTP API: stateless; sessions live on /ws.
        return web.json_response({"episode_id": None, "step_count": 0})

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise web.HTTPUnprocessableEntity(
                text=json.dumps({"detail": f"invalid JSON: {exc}"}), content_type="application/json"
            ) from None
        if not isinstance(body, dict):
            raise web.HTTPUnprocessableEntity(
                text=json.dumps({"detail": "the body must be a JSON object"}),
                content_type="application/json",
            )
        return body

    async def _one_shot(self, reset: dict[str, Any], action: dict[str, Any] | None) -> web.Response:
        """OpenEnv's HTTP /reset and /step: a fresh environment per request, released
        before the answer."""
        session = Session(self)
        try:
            result = await session.reset(reset)
            if action is not None:
                result = await session.step(action)
        except ValidationError as exc:
            return web.json_response(
                {"detail": json.loads(exc.json(include_url=False))}, status=422
            )
        except InvalidRequestError as exc:
            return web.json_response({"detail": str(exc)}, status=422)
        except CapacityError as exc:
            return web.json_response({"detail": str(exc)}, status=503)
        except MegaFlowError as exc:
            return web.json_response({"detail": str(exc)}, status=500)
        finally:
            await session.close()
        return web.json_response(result)

    async def _http_reset(self, request: web.Request) -> web.Response:
        return await self._one_shot(await self._json_body(request), None)

    async def _http_step(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        action = body.get("action")
        if not isinstance(action, dict):
            return web.json_response({"detail": "the body needs an `action` object"}, status=422)
        step_timeout = body.get("timeout_s")
        if isinstance(step_timeout, int | float) and "timeout_s" not in action:
            action = {**action, "timeout_s": step_timeout}
        return await self._one_shot({}, action)

    # -- WebSocket sessions -------------------------------------------------------
    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            heartbeat=self.config.ws_heartbeat_s,
            max_msg_size=self.config.max_message_mib * 1024 * 1024,
        )
        await ws.prepare(request)
        if len(self.sessions) >= self.config.max_sessions:
            await ws.send_json(
                _error(
                    f"server at capacity ({self.config.max_sessions} sessions)",
                    "CAPACITY_REACHED",
                    active_sessions=len(self.sessions),
                    max_sessions=self.config.max_sessions,
                )
            )
            await ws.close()
            return ws
        session = Session(self, ws)
        self.sessions[session.session_id] = session
        inbox: asyncio.Queue[str | None] = asyncio.Queue()
        worker = asyncio.create_task(self._serve_session(session, inbox))
        try:
            # Read all the time, so that pings are answered while a step runs.
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    if '"cancel"' in message.data and _is_cancel(message.data):
                        if session.current is not None:
                            session.current.cancel()
                        continue
                    inbox.put_nowait(message.data)
                elif message.type == WSMsgType.BINARY:
                    inbox.put_nowait(message.data.decode(errors="replace"))
                elif message.type == WSMsgType.ERROR:
                    break
                if worker.done():
                    break
        finally:
            inbox.put_nowait(None)
            if not worker.done() and ws.closed:
                worker.cancel()  # the client is gone: no one reads the answer
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
            await session.close()
        return ws

    async def _serve_session(self, session: Session, inbox: asyncio.Queue[str | None]) -> None:
        ws = session.ws
        assert ws is not None
        while (raw := await inbox.get()) is not None:
            if session.closed:
                return
            session.busy += 1
            answer = session.current = asyncio.create_task(self._answer(session, raw))
            try:
                reply = await answer
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # this worker is being stopped
                    answer.cancel()
                    raise
                reply = _error("cancelled by a cancel message", "CANCELLED")
            finally:
                session.current = None
                session.busy -= 1
                session.touch()
            if reply is None:  # `close`
                await ws.close()
                return
            await ws.send_json(reply)

    async def _answer(self, session: Session, raw: str) -> dict[str, Any] | None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError as exc:
            return _error(f"Invalid JSON: {exc}", "INVALID_JSON")
        if not isinstance(message, dict):
            return _error("a message is a JSON object", "INVALID_JSON")
        kind = message.get("type", "")
        data = message.get("data") or {}
        try:
            if kind == "reset":
                return {"type": "observation", "data": await session.reset(data)}
            if kind == "step":
                return {"type": "observation", "data": await session.step(data)}
            if kind == "state":
                return {"type": "state", "data": await session.state()}
            if kind == "close":
                return None
            return _error(f"Unknown message type: {kind}", "UNKNOWN_TYPE")
        except ValidationError as exc:
            errors = json.loads(exc.json(include_url=False))
            return _error("Invalid message", "VALIDATION_ERROR", errors=errors)
        except MegaFlowError as exc:
            if isinstance(exc, NotFoundError | SandboxError) and kind != "reset":
                session.env_id = ""  # the sandbox is gone (reaped, died): reset for a new one
            return _error(str(exc), "EXECUTION_ERROR", error_kind=type(exc).__name__)
        except Exception as exc:  # a bug or a transport failure: answer, keep the session
            log.exception("session %s: %s failed", session.session_id, kind)
            return _error(f"{type(exc).__name__}: {exc}", "EXECUTION_ERROR")


async def serve(
    listen: str,
    config: OpenEnvConfig | None = None,
    *,
    env_address: str | None = None,
    env_config: EnvServiceConfig | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """`megaflow serve openenv`: the OpenEnv server on ``listen`` (host:port, port 0:
    any free one) until ``stop`` is set or SIGTERM/SIGINT arrives. Sessions get
    environments of the Environment Service at ``env_address``, or of one hosted in
    this process (``env_config``: its local sandboxes), stopped on the way out."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    host, _, port = listen.rpartition(":")
    embedded: SandboxEnvironmentService | None = None
    remote: EnvironmentServiceClient | None = None
    env: EnvironmentService
    if env_address:
        env = remote = EnvironmentServiceClient(env_address)
    else:
        env = embedded = SandboxEnvironmentService(env_config)
        try:
            await embedded.start()
        except MegaFlowError as error:
            print(f"megaflow openenv: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    server = OpenEnvServer(env, config, host=host or "127.0.0.1", port=int(port or 0))
    try:
        await server.start()
        print(f"megaflow openenv ready on {server.address}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        if embedded is not None:
            await embedded.stop()
        if remote is not None:
            await remote.close()
