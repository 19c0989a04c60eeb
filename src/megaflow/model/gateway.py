"""An OpenAI-compatible HTTP gateway in front of the Model Service (aiohttp.web).

Unmodified agent frameworks point their OpenAI client at `gateway.base_url` and get
MegaFlow's models, with every call tied to a task and its token ids recorded:

    POST /v1/chat/completions   chats, tools and tool_calls both ways; `stream: true`
                                answers with SSE chunks ending in `data: [DONE]`
    POST /v1/completions        the prompt is sent as a single user message
    GET  /v1/models             the Model Service's models
    GET  /v1/megaflow/trajectories/{task_id}
                                the recorded turns of a task, as the JSON form of a
                                `megaflow.v1.Trajectory` (token ids, logprobs, replica)
    DELETE /v1/megaflow/trajectories/{task_id}
                                forget them
    GET  /health

Which task a call belongs to: the `X-MegaFlow-Task: <task id>` header, else
`Authorization: Bearer <key>` with a key from `issue_key(task_id)`. A call with
neither (or an unknown key) is served but not recorded, unless `require_key` is set,
when it gets 401. Only calls tied to a task are recorded; the gateway keeps the
`max_recorded_tasks` most recently used tasks, and of each the most recent
`max_recorded_turns` turns (so memory stays bounded even when clients reuse task ids).

Errors are OpenAI-style JSON, `{"error": {"message", "type", "code", "param"}}`:
400 malformed request, 401 missing key, 404 unknown model or route, 413 body too
large, 429 no capacity (the gateway's own `max_in_flight` or a `CapacityError`), 503
model unavailable, 504 no answer within `request_timeout_s`, 500 a bug.

HTTP is aiohttp on both sides (design.md §5: httpx collapses under fan-out).

The request path is kept lean, because with external scaffolds every model call crosses
it: the body is parsed once (orjson) into the `GenerateRequest` the Model Service takes,
the answer is built as a dict straight from the `GenerateResponse` and serialised once
(orjson), there is no lock, and a task's recording appends the new turn (it does not copy
the whole conversation again). `stream: true` is answered incrementally: each chunk of
the Model Service's `generate_stream` goes out as SSE as soon as it arrives (text
deltas, then the tool calls, the finish reason and the usage with the last chunk), and
the task's recorded turn is the same as a non-streamed call's. `reuse_port=True` lets several
processes serve one port (`megaflow.model.gateway_workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field

from megaflow.contract import ModelService
from megaflow.core.errors import (
    CancelledTaskError,
    CapacityError,
    DeadlineExceededError,
    InfrastructureError,
    InvalidRequestError,
    MegaFlowError,
    NotFoundError,
)
from megaflow.core.runtime import coarse_timeout_at
from megaflow.model import gateway_codec as codec
from megaflow.model.backend import whole_answer_chunk
from megaflow.v1 import common_pb2, model_pb2

__all__ = ["TASK_HEADER", "Gateway", "GatewayConfig"]

log = logging.getLogger(__name__)

TASK_HEADER = "X-MegaFlow-Task"
# Pending connections the kernel queues per listening socket (capped by somaxconn):
# aiohttp's default of 128 drops SYNs when thousands of clients connect at once.
LISTEN_BACKLOG = 4096


class GatewayConfig(BaseModel):
    """Limits and policy of the gateway."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of one model call through the gateway."
    )
    max_in_flight: int = Field(
        default=16_384,
        ge=1,
        description="Concurrent model calls; more are answered 429 (an agent task has at "
        "most one call in flight: 10,000 concurrent tasks fit).",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted."
    )
    require_key: bool = Field(
        default=False, description="Answer 401 to calls not tied to a task by key or header."
    )
    max_recorded_tasks: int = Field(
        default=10_000, ge=1, description="Tasks whose trajectories are kept (LRU)."
    )
    max_recorded_turns: int = Field(
        default=1_000,
        ge=4,
        description="Turns kept per task: a task id that keeps being reused (a client "
        "tagging every call with the same id) keeps its most recent turns; past the bound "
        "the oldest quarter is dropped at once (amortised), and `turns[].index` keeps "
        "counting.",
    )


_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_TRAJECTORIES = "/v1/megaflow/trajectories/"


def _not_found() -> web.Response:  # what aiohttp's router answers to an unknown path
    return web.Response(status=404, text="404: Not Found")


def _loop_time(after_s: float) -> float:
    return asyncio.get_running_loop().time() + after_s


class _HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error_response(status: int, kind: str, message: str, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    return _json(body, status)


def _classify(error: BaseException) -> tuple[int, str, str | None]:
    if isinstance(error, InvalidRequestError):
        return 400, "invalid_request_error", None
    if isinstance(error, NotFoundError):
        return 404, "not_found_error", "model_not_found"
    if isinstance(error, CapacityError):
        return 429, "rate_limit_error", "capacity"
    if isinstance(error, DeadlineExceededError | TimeoutError):
        return 504, "timeout_error", "timeout"
    if isinstance(error, CancelledTaskError):
        return 409, "cancelled_error", "task_cancelled"
    if isinstance(error, InfrastructureError):
        return 503, "service_unavailable_error", "model_unavailable"
    return 500, "internal_error", None


class Gateway:
    """Serves the OpenAI API over `model_service`. `async with Gateway(svc) as gw: ...`"""

    def __init__(
        self,
        model_service: ModelService,
        host: str = "127.0.0.1",
        port: int = 0,
        config: GatewayConfig | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: bind with SO_REUSEPORT, so that other processes (gateway workers)
        may serve the same host:port."""
        self.model_service = model_service
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.config = config or GatewayConfig()
        self._keys: dict[str, str] = {}
        self._trajectories: OrderedDict[str, common_pb2.Trajectory] = OrderedDict()
        self._in_flight = 0
        self._runner: web.BaseRunner | None = None

    # -- lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://host:port` once started."""
        return f"http://{self.host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """Model calls the gateway is waiting on now."""
        return self._in_flight

    @property
    def base_url(self) -> str:
        """What to give an OpenAI client as `base_url`."""
        return self.url + "/v1"

    def app(self) -> web.Application:
        """The aiohttp application (routes only; `start()` serves it)."""
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self._wrap(self._chat))
        app.router.add_post("/v1/completions", self._wrap(self._completions))
        app.router.add_get("/v1/models", self._wrap(self._models))
        path = "/v1/megaflow/trajectories/{task_id}"
        app.router.add_get(path, self._wrap(self._get_trajectory))
        app.router.add_delete(path, self._wrap(self._delete_trajectory))
        app.router.add_get("/health", self._wrap(self._health))
        return app

    async def start(self) -> None:
        """Listen on `host:port` (port 0: a free port, then stored in `port`).

        Served by aiohttp's low-level server (`web.Server`) with the gateway's own
        dispatch on (method, path): the same routes and answers as `app()`, without the
        application's router, middleware chain and per-request match objects."""
        if self._runner is not None:
            return
        server = web.Server(self._dispatch, request_factory=self._make_request, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=LISTEN_BACKLOG,
        )
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        log.info("OpenAI gateway on %s", self.base_url)

    def _make_request(
        self,
        message: Any,
        payload: Any,
        protocol: Any,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            asyncio.get_running_loop(),
            client_max_size=self.config.max_body_bytes,
        )

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request (what `app()`'s router does, for the routes it has)."""
        method, path = request.method, request.path
        if path == "/v1/chat/completions":
            handler = self._chat if method == "POST" else None
            allowed = "POST"
        elif path == "/v1/completions":
            handler = self._completions if method == "POST" else None
            allowed = "POST"
        elif path == "/v1/models" or path == "/health":
            handler = (
                (self._models if path == "/v1/models" else self._health)
                if method
                in (
                    "GET",
                    "HEAD",
                )
                else None
            )
            allowed = "GET,HEAD"
        elif path.startswith(_TRAJECTORIES) and "/" not in path[len(_TRAJECTORIES) :]:
            task_id = path[len(_TRAJECTORIES) :]
            if not task_id:
                return _not_found()
            if method in ("GET", "HEAD"):
                return await self._guarded(request, lambda r: self._trajectory_answer(task_id))
            if method == "DELETE":
                return await self._guarded(request, lambda r: self._delete_answer(task_id))
            handler, allowed = None, "GET,HEAD,DELETE"
        else:
            return _not_found()
        if handler is None:
            return web.Response(
                status=405, text="405: Method Not Allowed", headers={"Allow": allowed}
            )
        return await self._guarded(request, handler)

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- tasks and recording ------------------------------------------------------------

    def issue_key(self, task_id: str) -> str:
        """A fresh API key that ties calls to `task_id` (pass it as the client's api_key)."""
        if not task_id:
            raise InvalidRequestError("issue_key needs a task id")
        key = "mf-" + secrets.token_urlsafe(24)
        self._keys[key] = task_id
        return key

    def revoke_key(self, key: str) -> None:
        """Forget a key; later calls with it are anonymous (or 401 with `require_key`)."""
        self._keys.pop(key, None)

    def trajectory(self, task_id: str) -> common_pb2.Trajectory | None:
        """What the gateway recorded for `task_id`, if anything."""
        return self._trajectories.get(task_id)

    def pop_trajectory(self, task_id: str) -> common_pb2.Trajectory | None:
        """Hand over and forget the record of `task_id`."""
        return self._trajectories.pop(task_id, None)

    def _task_id(self, request: web.BaseRequest) -> str:
        header = request.headers.get(TASK_HEADER, "").strip()
        if header:
            return header
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        task_id = self._keys.get(key, "")
        if not task_id and self.config.require_key:
            raise _HttpError(
                401,
                "authentication_error",
                f"give a task key (Authorization: Bearer <key>) or a {TASK_HEADER} header",
                "invalid_api_key",
            )
        return task_id

    def _record(
        self,
        request: model_pb2.GenerateRequest,
        response: model_pb2.GenerateResponse,
        latency_s: float,
    ) -> None:
        """Add one turn to the task's trajectory: what was new in the prompt, the answer.

        A prompt at least as long as the recorded conversation is taken to extend it (its
        new tail is appended; the conversation is not copied again each turn); a shorter
        one (the client cut or rewrote its history) replaces it."""
        task_id = request.task_id
        trajectories = self._trajectories
        trajectory = trajectories.get(task_id)
        if trajectory is None:
            trajectory = trajectories[task_id] = common_pb2.Trajectory(task_id=task_id)
            if len(trajectories) > self.config.max_recorded_tasks:
                trajectories.popitem(last=False)
        else:
            trajectories.move_to_end(task_id)  # most recently used last
        known = len(trajectory.messages)
        if len(request.messages) < known:  # the client cut or rewrote its history
            del trajectory.messages[:]
            known = 0
        delta = request.messages[known:]
        trajectory.messages.extend(delta)
        trajectory.messages.append(response.message)
        turns = trajectory.turns
        index = turns[-1].index + 1 if turns else 0
        if len(turns) >= self.config.max_recorded_turns:  # drop the oldest quarter at once
            del turns[: len(turns) - self.config.max_recorded_turns * 3 // 4]
        turns.add(
            index=index,
            prompt_delta=delta,
            response=response.message,
            model_version=response.model_version,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            model_latency_s=latency_s,
            prompt_token_ids=response.prompt_token_ids,
            completion_token_ids=response.completion_token_ids,
            completion_logprobs=response.completion_logprobs,
            replica=response.replica,
        )

    # -- handlers -------------------------------------------------------------------------

    def _wrap(self, handler: Callable[[Any], Any]) -> Callable[[web.Request], Any]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await self._guarded(request, handler)

        return wrapped

    async def _guarded(
        self, request: web.BaseRequest, handler: Callable[[Any], Any]
    ) -> web.StreamResponse:
        """`handler(request)`, its errors answered OpenAI-style."""
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except _HttpError as error:
            return _error_response(error.status, error.kind, str(error), error.code)
        except web.HTTPRequestEntityTooLarge:
            limit = self.config.max_body_bytes
            return _error_response(413, "invalid_request_error", f"body over {limit} bytes", None)
        except MegaFlowError as error:
            status, kind, code = _classify(error)
            return _error_response(status, kind, str(error), code)
        except Exception as error:
            log.exception("gateway bug on %s %s", request.method, request.path)
            return _error_response(500, "internal_error", f"internal error: {error}", None)

    async def _body(self, request: web.BaseRequest) -> Any:
        raw = await request.read()
        try:
            return orjson.loads(raw)
        except ValueError as error:
            raise InvalidRequestError(f"the body is not valid JSON: {error}") from error

    async def _generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        if self._in_flight >= self.config.max_in_flight:
            raise CapacityError(f"the gateway has {self._in_flight} calls in flight; retry later")
        self._in_flight += 1
        started = time.monotonic()
        try:
            # coarse: one shared timer for all calls, not one timer handle per call
            async with coarse_timeout_at(_loop_time(self.config.request_timeout_s)):
                response = await self.model_service.generate(request)
        except TimeoutError as error:
            raise DeadlineExceededError(
                f"no answer from the model within {self.config.request_timeout_s:g}s"
            ) from error
        finally:
            self._in_flight -= 1
        if request.task_id:
            self._record(request, response, time.monotonic() - started)
        return response

    async def _serve(
        self,
        request: web.BaseRequest,
        parse: Callable[[Any, str], model_pb2.GenerateRequest],
        body_of: Callable[[dict[str, Any], model_pb2.GenerateResponse], dict[str, Any]],
        encoder: type[codec.StreamEncoder],
    ) -> web.StreamResponse:
        task_id = self._task_id(request)
        body = await self._body(request)
        generate_request = parse(body, task_id)
        if body.get("stream"):
            return await self._stream(request, body, generate_request, encoder)
        response = await self._generate(generate_request)
        return _json(body_of(body, response))

    async def _stream(
        self,
        request: web.BaseRequest,
        body: dict[str, Any],
        generate_request: model_pb2.GenerateRequest,
        encoder_class: type[codec.StreamEncoder],
    ) -> web.StreamResponse:
        """Send the answer as SSE chunks while the Model Service produces it.

        A failure before the first chunk is an ordinary error answer (its HTTP status);
        one after it ends the stream with an OpenAI-style `data: {"error": ...}` event
        (no `[DONE]`). A client that goes away closes the service's stream, which stops
        the generation."""
        if self._in_flight >= self.config.max_in_flight:
            raise CapacityError(f"the gateway has {self._in_flight} calls in flight; retry later")
        stream = getattr(self.model_service, "generate_stream", None)
        chunks: AsyncIterator[model_pb2.GenerateChunk] = (
            stream(generate_request)
            if stream is not None
            else _whole_answer(self.model_service, generate_request)
        )
        self._in_flight += 1
        started = time.monotonic()
        deadline = _loop_time(self.config.request_timeout_s)
        response: web.StreamResponse | None = None
        try:
            chunk = await self._next_chunk(chunks, deadline)
            response = web.StreamResponse(headers=_SSE_HEADERS)
            await response.prepare(request)
            encoder = encoder_class(body, generate_request.model)
            while True:
                payloads = encoder.feed(chunk)
                if payloads:
                    await response.write(b"".join(b"data: " + p + b"\n\n" for p in payloads))
                if chunk.HasField("final"):
                    break
                transport = request.transport
                if transport is None or transport.is_closing():  # also for chunks not sent
                    raise ConnectionResetError("the client closed the connection")
                chunk = await self._next_chunk(chunks, deadline)
            await response.write(b"data: [DONE]\n\n")
            if generate_request.task_id:
                self._record(generate_request, chunk.final, time.monotonic() - started)
            await response.write_eof()
            return response
        except (MegaFlowError, TimeoutError) as error:
            if response is None:
                raise  # nothing sent yet: an ordinary error answer
            _, kind, code = _classify(error)
            event = {"error": {"message": str(error), "type": kind, "code": code, "param": None}}
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
                await response.write_eof()
            return response
        except ConnectionError:  # the client went away: stop generating for it
            if response is None:
                raise  # not the client's connection (nothing was sent to it yet)
            log.debug("client left a streamed answer (task %r)", generate_request.task_id)
            return response
        finally:
            self._in_flight -= 1
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _next_chunk(
        self, chunks: AsyncIterator[model_pb2.GenerateChunk], deadline: float
    ) -> model_pb2.GenerateChunk:
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(chunks)
        except TimeoutError as error:
            raise DeadlineExceededError(
                f"no answer from the model within {self.config.request_timeout_s:g}s"
            ) from error
        except StopAsyncIteration:
            raise InfrastructureError("the model's stream ended without its last chunk") from None

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._serve(request, codec.chat_request, codec.chat_body, codec.ChatStream)

    async def _completions(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._serve(
            request, codec.completion_request, codec.completion_body, codec.CompletionStream
        )

    async def _models(self, request: web.BaseRequest) -> web.Response:
        listed = await self.model_service.list_models(model_pb2.ListModelsRequest())
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": f"megaflow:{m.backend}"}
            for m in listed.models
        ]
        return _json({"object": "list", "data": data})

    async def _get_trajectory(self, request: web.Request) -> web.Response:
        return await self._trajectory_answer(request.match_info["task_id"])

    async def _trajectory_answer(self, task_id: str) -> web.Response:
        trajectory = self._trajectories.get(task_id)
        if trajectory is None:
            raise _HttpError(404, "not_found_error", f"nothing recorded for task {task_id!r}")
        return _json(json_format.MessageToDict(trajectory, preserving_proto_field_name=True))

    async def _delete_trajectory(self, request: web.Request) -> web.Response:
        return await self._delete_answer(request.match_info["task_id"])

    async def _delete_answer(self, task_id: str) -> web.Response:
        if self._trajectories.pop(task_id, None) is None:
            raise _HttpError(404, "not_found_error", f"nothing recorded for task {task_id!r}")
        return _json({"deleted": task_id})

    async def _health(self, request: web.BaseRequest) -> web.Response:
        health = await self.model_service.health(common_pb2.HealthRequest())
        return _json({"ok": health.ok, "detail": health.detail})


async def _whole_answer(
    service: ModelService, request: model_pb2.GenerateRequest
) -> AsyncIterator[model_pb2.GenerateChunk]:
    """A Model Service without `generate_stream`: its whole answer as one chunk."""
    yield whole_answer_chunk(await service.generate(request))
