"""`OpenAIBackend`: any OpenAI-compatible chat-completions server, over aiohttp.

One `OpenAIBackend` talks to one upstream (vLLM, SGLang, llm-katan, a hosted API...)
through one shared `aiohttp.ClientSession` with a bounded connection pool. It does
not use httpx or the `openai` SDK: those collapse under high concurrency on our
machines, while one aiohttp session with a `TCPConnector(limit=...)` does not.

Errors (see `megaflow.core.errors`):

    connection refused, DNS failure, reset      ModelUnavailableError (retryable)
    no answer within `request_timeout_s`        ModelUnavailableError (retryable)
    HTTP 5xx, 429, 408                          ModelUnavailableError (retryable)
    malformed JSON, missing `choices`           ModelUnavailableError (retryable)
    any other HTTP 4xx (400, 401, 404, 422...)  InvalidRequestError (final), with
                                                the upstream's own error message
    a `ToolSpec` whose schema is not JSON       InvalidRequestError (final)

Token fidelity: each request asks for `logprobs` (config `request_logprobs`) and, with
`request_token_ids`, for vLLM's token-id extensions; `prompt_token_ids`,
`completion_token_ids` and `completion_logprobs` are filled from whatever the upstream
returns (see `_completion_tokens`) and left empty otherwise.

Retries (`OpenAIBackendConfig.retry`, a `RetryPolicy`): a retryable failure of a chat
call (HTTP 429/500/502/503/504/408, a refused or reset connection, a timeout, a
malformed answer) is retried with exponential backoff and full jitter, waiting at least
what a `Retry-After` header asks (seconds or an HTTP date; a wait longer than
`max_backoff_s` is not made: the error goes back at once). Retries never run past the
call's deadline: `call_timeout_s`, and the deadline the Model Service sets around the
call (`megaflow.model.resilience.call_scope`); each attempt's own timeout is cut to what
is left. When the service says another healthy replica can take the call
(`failover`), a failed attempt is raised at once so that replica gets the retry.
Final errors (400, 401, 403, 404, 422...) are never retried. `retry_stats()` counts
retries, retried calls, recovered calls and calls that gave up.

Streaming (`generate_stream`): the same chat with `stream: true` (and
`stream_options.include_usage`); each SSE event with new content or tokens is handed
on as a `GenerateChunk` as it arrives, tool-call deltas are assembled, and the last
chunk carries the whole answer. Failures before the first chunk is handed on (an HTTP
error status, a refused connection, a stream that breaks before any token) are retried
exactly as `generate`'s; once a chunk has gone out, a failure (the connection drops, an
`error` event, the stream ends without `[DONE]`) ends the stream with
`ModelUnavailableError` at once: a silent retry would repeat text the caller has.

`preflight()` / `check_upstream()`: GET /v1/models with a short timeout, before any
task starts; every way that fails (unreachable, no or wrong key, unknown model) is one
`InvalidRequestError` that names the cause.

A request that runs past its deadline raises `ModelUnavailableError` (not
`DeadlineExceededError`): the upstream is too slow or stuck, which is a backend
failure that a retry (perhaps on another replica) can fix; `DeadlineExceededError`
is kept for MegaFlow's own budgets (step, task). Every network await is bounded by
`request_timeout_s`, so `generate` never hangs.

The backend is bound to the event loop in which it first makes a request (its
session lives there); use one backend per loop, and `await close()` it when done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from megaflow.core.errors import InvalidRequestError, ModelUnavailableError
from megaflow.model.openai_messages import message_to_openai, tool_call_from_openai, tool_to_openai
from megaflow.model.resilience import RetryPolicy, backoff_delay, current_call, parse_retry_after
from megaflow.v1 import common_pb2, model_pb2

__all__ = [
    "OpenAIBackend",
    "OpenAIBackendConfig",
    "check_upstream",
    "list_upstream_models",
    "normalise_base_url",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
# How much of an upstream's body goes into an error message.
_BODY_EXCERPT = 300
# HTTP statuses below 500 that still mean "try again later".
_RETRYABLE_4XX = frozenset({408, 429})


def normalise_base_url(url: str) -> str:
    """The API root of an OpenAI-compatible server, ending in `/v1`, no trailing slash.

    "http://h:8000", "http://h:8000/", "http://h:8000/v1" and "http://h:8000/v1/" all
    become "http://h:8000/v1"; a prefix is kept ("https://h/openai" -> "https://h/openai/v1").
    """
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    if url.endswith("/chat/completions"):
        url = url.removesuffix("/chat/completions")
    if not url.endswith("/v1"):
        url += "/v1"
    return url


class OpenAIBackendConfig(BaseModel):
    """How to reach one OpenAI-compatible chat-completions server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(
        description=(
            "Root of the upstream server, with or without `/v1` (e.g. 'http://127.0.0.1:8000' "
            "or 'http://127.0.0.1:8000/v1'). Normalised to end in '/v1'."
        )
    )
    model: str = Field(
        default="",
        description=(
            "The upstream's model name, sent as `model` in each request. Empty: the first "
            "model listed by GET /v1/models, fetched on first use (or by `resolve_model()`)."
        ),
    )
    api_key: str | None = Field(
        default=None,
        description=(
            "Bearer token sent as `Authorization: Bearer <key>`. None: the environment "
            f"variable {API_KEY_ENV}, read when the backend is constructed; if that is "
            "unset too, no Authorization header is sent."
        ),
    )
    request_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description=(
            "Deadline of one request, in seconds: waiting for a pooled connection, connecting, "
            "sending and reading the whole answer."
        ),
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        description="Most concurrent HTTP connections to the upstream; further requests wait.",
    )
    name: str = Field(
        default="",
        description="The model's name inside MegaFlow (what tasks ask for). Empty: `model`.",
    )
    version: str = Field(
        default="upstream",
        description="Reported as `model_version` in every response (e.g. a checkpoint tag).",
    )
    request_logprobs: bool = Field(
        default=True,
        description=(
            "Send `logprobs: true, top_logprobs: 0` and keep each completion token's logprob. "
            "Turn off for an upstream that rejects the parameter."
        ),
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy,
        description="Retries of a chat call's retryable failures (backoff with full jitter).",
    )
    call_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Budget of one chat call, retries and backoff included. None: bounded by the "
            "caller's deadline (the Model Service's) and by the retry policy only."
        ),
    )
    request_token_ids: bool = Field(
        default=False,
        description=(
            "Ask for token ids the vLLM way (`return_token_ids`, `return_tokens_as_token_ids`; "
            "vLLM >= 0.10.2, MegaFlow's gateway). Off by default: hosted APIs reject unknown "
            "parameters."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return normalise_base_url(value)


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _BODY_EXCERPT else text[:_BODY_EXCERPT] + "..."


def _upstream_error_message(body: bytes) -> str:
    """The human message of an error answer: OpenAI's {"error": {"message"}}, else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return _excerpt(body) or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            value = data.get(key)
            if isinstance(value, str):
                return value
            if value is not None:
                return json.dumps(value)[:_BODY_EXCERPT]
    return _excerpt(body)


def _raise_for_status(url: str, status: int, body: bytes) -> None:
    """Map a non-2xx answer to MegaFlow's errors; return for 2xx."""
    if 200 <= status < 300:
        return
    message = _upstream_error_message(body)
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        raise InvalidRequestError(f"{url} rejected the request (HTTP {status}): {message}")
    raise ModelUnavailableError(f"{url} answered HTTP {status}: {message}")


async def _exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, bytes, str | None]:
    """One HTTP exchange with a hard deadline: (status, body, Retry-After header), or
    `ModelUnavailableError` when no answer came (refused, reset, DNS, timeout)."""
    try:
        # aiohttp's own total timeout covers pool wait, connect, send and reading the body;
        # the outer asyncio.timeout is a backstop in case any await slips past it.
        async with asyncio.timeout(timeout_s + 1.0):
            async with session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                status = resp.status
                raw = await resp.read()
                retry_after = resp.headers.get("Retry-After")
    except TimeoutError as exc:  # aiohttp's timeout errors subclass TimeoutError
        raise ModelUnavailableError(
            f"{method} {url} timed out after {timeout_s:g}s with no complete answer"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise ModelUnavailableError(f"cannot connect to {url}: {exc}") from exc
    except aiohttp.ClientError as exc:
        detail = str(exc) or type(exc).__name__
        raise ModelUnavailableError(f"{method} {url} failed: {detail}") from exc
    return status, raw, retry_after


def _decode(url: str, status: int, raw: bytes) -> Any:
    """The parsed JSON of an answer, or the MegaFlow error its status means."""
    _raise_for_status(url, status, raw)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ModelUnavailableError(
            f"{url} answered HTTP {status} with malformed JSON: {_excerpt(raw)!r}"
        ) from exc


async def _request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str],
    body: bytes | None = None,
) -> Any:
    """One HTTP exchange with a hard deadline; the parsed JSON answer, or a MegaFlow error."""
    status, raw, _ = await _exchange(
        session, method, url, timeout_s=timeout_s, headers=headers, body=body
    )
    return _decode(url, status, raw)


def _model_ids(url: str, data: Any) -> list[str]:
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ModelUnavailableError(f"{url} answered without a `data` list: {str(data)[:200]}")
    return [str(item["id"]) for item in items if isinstance(item, dict) and "id" in item]


async def list_upstream_models(
    base_url: str, timeout_s: float = 10.0, *, api_key: str | None = None
) -> list[str]:
    """The model ids an OpenAI-compatible server lists at GET /v1/models.

    `api_key` None means the OPENAI_API_KEY environment variable (if set). Raises
    `ModelUnavailableError` if the server cannot be reached in `timeout_s` or answers
    nonsense, `InvalidRequestError` for a 4xx (e.g. a missing key).
    """
    url = normalise_base_url(base_url) + "/models"
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    async with aiohttp.ClientSession() as session:
        data = await _request_json(
            session, "GET", url, timeout_s=timeout_s, headers=_auth_headers(key)
        )
    return _model_ids(url, data)


async def check_upstream(
    base_url: str,
    model: str = "",
    *,
    api_key: str | None = None,
    timeout_s: float = 3.0,
    allow_unreachable: bool = False,
) -> list[str]:
    """Pre-flight check of an OpenAI-compatible server: it answers GET /v1/models within
    `timeout_s`, accepts the key, and lists `model` (any model when `model` is empty).
    Returns the listed model ids. Every failure is one `InvalidRequestError` that names
    the cause (a configuration to fix, not a fault to retry). `api_key` None: the
    OPENAI_API_KEY environment variable. `allow_unreachable`: a server that does not
    answer (yet: still starting) is not an error; [] is returned."""
    root = normalise_base_url(base_url)
    url = root + "/models"
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    try:
        async with aiohttp.ClientSession() as session:
            status, raw, _ = await _exchange(
                session, "GET", url, timeout_s=timeout_s, headers=_auth_headers(key)
            )
    except ModelUnavailableError as exc:
        if allow_unreachable:
            return []
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientConnectorDNSError):
            why = f"its host name does not resolve ({cause.os_error})"
        elif isinstance(cause, aiohttp.ClientConnectorError):
            why = f"nothing answers there ({cause.os_error}); is the URL or port wrong?"
        elif isinstance(cause, TimeoutError):
            why = f"no answer within {timeout_s:g}s"
        else:
            why = str(exc)
        raise InvalidRequestError(f"model server {root} is unreachable: {why}") from None
    message = _upstream_error_message(raw) if status >= 400 else ""
    if status in (401, 403):
        if not key:
            raise InvalidRequestError(
                f"model server {root} requires an API key (HTTP {status}: {message}) and "
                f"none is set: export {API_KEY_ENV}"
            )
        raise InvalidRequestError(
            f"model server {root} rejected the API key (HTTP {status}: {message}); "
            f"check {API_KEY_ENV}"
        )
    if status == 404:
        raise InvalidRequestError(
            f"{url} does not exist (HTTP 404): is {root} an OpenAI-compatible API root?"
        )
    if status >= 400:
        raise InvalidRequestError(
            f"model server {root} answered GET /v1/models with HTTP {status}: {message}"
        )
    try:
        ids = _model_ids(url, json.loads(raw))
    except (ValueError, ModelUnavailableError):
        raise InvalidRequestError(f"{url} did not answer a model list: {_excerpt(raw)!r}") from None
    if model and model not in ids:
        raise InvalidRequestError(
            f"model server {root} does not serve model {model!r}; it serves: "
            + (", ".join(repr(i) for i in ids) or "nothing")
        )
    if not ids:
        raise InvalidRequestError(f"model server {root} lists no models")
    return ids


def _tool_calls_from_openai(url: str, raw: Any) -> list[common_pb2.ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ModelUnavailableError(f"{url} answered with malformed tool_calls: {str(raw)[:200]}")
    calls = []
    for item in raw:
        call = tool_call_from_openai(item)
        if call is None:
            raise ModelUnavailableError(f"{url} answered with a malformed tool call: {item!r}")
        calls.append(call)
    return calls


def _token_count(usage: Any, key: str) -> int:
    if not isinstance(usage, dict):
        return 0
    value = usage.get(key)
    try:
        return max(0, int(value)) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _int_list(raw: Any) -> list[int]:
    """A list of non-negative token ids, or [] if `raw` is anything else."""
    if not isinstance(raw, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in raw
    ):
        return []
    return list(raw)


def _completion_tokens(choice: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Completion token ids and logprobs from whichever fields the upstream filled.

    Ids: the choice's `token_ids` (vLLM `return_token_ids`), else the `token_id:<id>`
    token names of `logprobs.content` (vLLM `return_tokens_as_token_ids`, MegaFlow's
    gateway). Logprobs: `logprobs.content[].logprob`. Either is [] when absent.
    """
    ids = _int_list(choice.get("token_ids"))
    logprobs: list[float] = []
    block = choice.get("logprobs")
    content = block.get("content") if isinstance(block, dict) else None
    if isinstance(content, list) and all(isinstance(e, dict) for e in content):
        values = [e.get("logprob") for e in content]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            logprobs = [float(v) for v in values]  # type: ignore[arg-type]
        if not ids:
            names = [str(e.get("token", "")) for e in content]
            if names and all(n.startswith("token_id:") for n in names):
                ids = _int_list([int(n[9:]) for n in names if n[9:].isdigit()])
                ids = ids if len(ids) == len(names) else []
    return ids, logprobs


class OpenAIBackend:
    """A `ModelBackend` that forwards each chat to an OpenAI-compatible server."""

    kind = "openai"

    def __init__(self, config: OpenAIBackendConfig) -> None:
        self.config = config
        self.base_url = config.base_url
        self.chat_url = f"{config.base_url}/chat/completions"
        self.model = config.model
        self.name = config.name or config.model
        self.version = config.version
        self._api_key = (
            config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV)
        )
        self._headers = {"Content-Type": "application/json", **_auth_headers(self._api_key)}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resolve_lock: asyncio.Lock | None = None
        self._closed = False
        self._in_flight = 0
        self._requests = 0
        self._failures = 0
        self._rng = random.Random()
        # The backoff's wait and the clock of the call's budget (tests replace both).
        self._sleep = asyncio.sleep
        self._clock = time.monotonic
        self._retries = 0  # attempts after a call's first
        self._retried_calls = 0  # calls that needed at least one retry
        self._recovered = 0  # of those, the ones that succeeded
        self._gave_up = 0  # calls whose retryable failure went back to the caller
        self._handed_over = 0  # of those, handed to another replica at once (failover)

    def __repr__(self) -> str:
        return f"OpenAIBackend(name={self.name!r}, model={self.model!r}, url={self.base_url!r})"

    # -- plumbing -----------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ModelUnavailableError(f"OpenAI backend {self.name!r} ({self.base_url}) is closed")
        loop = asyncio.get_running_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.config.max_connections)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                f"OpenAIBackend {self.name!r} is bound to another event loop; "
                "use one backend per loop"
            )
        return self._session

    async def resolve_model(self) -> str:
        """The upstream model name: `config.model`, or the first of GET /v1/models.

        Fills `model` (and `name`, if no name was configured). Called by `generate` on
        first use when `config.model` is empty; call it yourself to learn `name` early.
        """
        if self.model:
            return self.model
        if self._resolve_lock is None:
            self._resolve_lock = asyncio.Lock()
        async with self._resolve_lock:
            if not self.model:
                url = f"{self.base_url}/models"
                data = await _request_json(
                    self._get_session(),
                    "GET",
                    url,
                    timeout_s=self.config.request_timeout_s,
                    headers={},
                )
                ids = _model_ids(url, data)
                if not ids:
                    raise ModelUnavailableError(f"{url} lists no models")
                self.model = ids[0]
                if not self.name:
                    self.name = self.model
                logger.info("OpenAI backend at %s: using upstream model %r", url, self.model)
        return self.model

    def _payload(self, request: model_pb2.GenerateRequest, *, stream: bool = False) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [message_to_openai(m) for m in request.messages],
            "temperature": request.temperature,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.tools:
            body["tools"] = [tool_to_openai(t) for t in request.tools]
        if choice := request.tool_choice:
            body["tool_choice"] = (
                choice
                if choice in ("auto", "none", "required")
                else {"type": "function", "function": {"name": choice}}
            )
        if request.max_tokens:
            body["max_tokens"] = request.max_tokens
        if self.config.request_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = 0
        if self.config.request_token_ids:
            body["return_token_ids"] = True
            body["return_tokens_as_token_ids"] = True
        return json.dumps(body).encode()

    def _parse(self, data: Any) -> model_pb2.GenerateResponse:
        url = self.chat_url
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ModelUnavailableError(
                f"{url} answered without choices: {json.dumps(data)[:_BODY_EXCERPT]}"
            )
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ModelUnavailableError(
                f"{url} answered a choice without a message: {json.dumps(choice)[:_BODY_EXCERPT]}"
            )
        content = message.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):  # e.g. a list of content parts
            content = json.dumps(content)
        usage = data.get("usage")
        completion_ids, logprobs = _completion_tokens(choice)
        return model_pb2.GenerateResponse(
            prompt_token_ids=_int_list(data.get("prompt_token_ids")),
            completion_token_ids=completion_ids,
            completion_logprobs=logprobs,
            message=common_pb2.ChatMessage(
                role=str(message.get("role") or "assistant"),
                content=content,
                tool_calls=_tool_calls_from_openai(url, message.get("tool_calls")),
            ),
            model=self.name,
            model_version=self.version,
            prompt_tokens=_token_count(usage, "prompt_tokens"),
            completion_tokens=_token_count(usage, "completion_tokens"),
            finish_reason=str(choice.get("finish_reason") or ""),
        )

    # -- ModelBackend ---------------------------------------------------------------

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        """Send one chat upstream, retrying retryable failures (see the module docstring)."""
        start = time.monotonic()
        self._requests += 1
        self._in_flight += 1
        try:
            if not request.messages:
                raise InvalidRequestError("a GenerateRequest needs at least one message")
            if not self.model:
                await self.resolve_model()
            response = await self._generate_with_retries(self._payload(request))
        except BaseException:
            self._failures += 1
            raise
        finally:
            self._in_flight -= 1
        response.latency_s = time.monotonic() - start
        return response

    async def _generate_with_retries(self, payload: bytes) -> model_pb2.GenerateResponse:
        start = self._clock()
        policy = self.config.retry
        scope = current_call()
        deadline = scope.deadline
        if self.config.call_timeout_s is not None:
            own = start + self.config.call_timeout_s
            deadline = own if deadline is None else min(deadline, own)
        retry = 0
        while True:
            timeout_s = self.config.request_timeout_s
            if deadline is not None:
                timeout_s = max(min(timeout_s, deadline - self._clock()), 0.001)
            retry_after: float | None = None
            try:
                status, raw, retry_after_header = await _exchange(
                    self._get_session(),
                    "POST",
                    self.chat_url,
                    timeout_s=timeout_s,
                    headers={},
                    body=payload,
                )
                if status >= 400:
                    retry_after = parse_retry_after(retry_after_header)
                response = self._parse(_decode(self.chat_url, status, raw))
            except ModelUnavailableError as error:
                if self._closed:
                    raise
                delay = self._retry_delay(error, retry, retry_after, deadline, scope.failover)
                if delay is None:
                    if not scope.failover:
                        self._gave_up += 1  # (a hand-over is counted as one)
                    raise
                if retry == 0:
                    self._retried_calls += 1
                retry += 1
                self._retries += 1
                logger.debug(
                    "%s: retry %d/%d in %.2fs after: %s (retries so far: %d)",
                    self.name,
                    retry,
                    policy.max_retries,
                    delay,
                    error,
                    self._retries,
                )
                await self._sleep(delay)
                continue
            if retry:
                self._recovered += 1
            return response

    async def generate_stream(
        self, request: model_pb2.GenerateRequest
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        """`generate`, streamed from the upstream's SSE (see the module docstring)."""
        start = time.monotonic()
        self._requests += 1
        self._in_flight += 1
        try:
            if not request.messages:
                raise InvalidRequestError("a GenerateRequest needs at least one message")
            if not self.model:
                await self.resolve_model()
            payload = self._payload(request, stream=True)
            retry = 0
            scope = current_call()
            deadline = scope.deadline
            if self.config.call_timeout_s is not None:
                own = self._clock() + self.config.call_timeout_s
                deadline = own if deadline is None else min(deadline, own)
            while True:
                timeout_s = self.config.request_timeout_s
                if deadline is not None:
                    timeout_s = max(min(timeout_s, deadline - self._clock()), 0.001)
                attempt = _SseAttempt(self, timeout_s)
                try:
                    async for chunk in attempt.run(payload):
                        if chunk.HasField("final"):
                            chunk.final.latency_s = time.monotonic() - start
                            if retry:
                                self._recovered += 1
                        yield chunk
                    return
                except ModelUnavailableError as error:
                    if attempt.sent or self._closed:
                        raise  # text went out: no retry (it would repeat it)
                    delay = self._retry_delay(
                        error, retry, attempt.retry_after, deadline, scope.failover
                    )
                    if delay is None:
                        if not scope.failover:
                            self._gave_up += 1
                        raise
                    if retry == 0:
                        self._retried_calls += 1
                    retry += 1
                    self._retries += 1
                    logger.debug(
                        "%s: stream retry %d in %.2fs after: %s", self.name, retry, delay, error
                    )
                    await self._sleep(delay)
        except BaseException:
            self._failures += 1
            raise
        finally:
            self._in_flight -= 1

    def _retry_delay(
        self,
        error: ModelUnavailableError,
        retry: int,
        retry_after: float | None,
        deadline: float | None,
        failover: bool,
    ) -> float | None:
        """How long to wait before retrying `error`, or None to raise it now."""
        policy = self.config.retry
        why = ""
        delay = 0.0
        if failover:
            self._handed_over += 1
            why = "another replica takes the retry"
        elif retry >= policy.max_retries:
            why = f"{policy.max_retries} retries spent"
        elif retry_after is not None and retry_after > policy.max_backoff_s:
            why = f"the server asks to wait {retry_after:g}s (more than {policy.max_backoff_s:g}s)"
        else:
            delay = backoff_delay(policy, retry, self._rng)
            if retry_after is not None:
                delay = max(delay, retry_after)
            if deadline is not None and self._clock() + delay >= deadline:
                why = "no time left in the call's budget"
        if why:
            if not failover:
                logger.info("%s: giving up on a call (%s): %s", self.name, why, error)
            return None
        return delay

    def retry_stats(self) -> dict[str, int]:
        """Counters of the retry policy since start."""
        return {
            "retries": self._retries,
            "retried_calls": self._retried_calls,
            "recovered_calls": self._recovered,
            "gave_up_calls": self._gave_up,
            "handed_to_another_replica": self._handed_over,
        }

    async def preflight(
        self, timeout_s: float = 3.0, *, allow_unreachable: bool = False
    ) -> list[str]:
        """`check_upstream` with this backend's URL, model and key; fills in the model
        (the first listed) when none was configured. InvalidRequestError names what is
        wrong (`allow_unreachable`: except that the server does not answer yet)."""
        ids = await check_upstream(
            self.base_url,
            self.model,
            api_key=self._api_key or "",
            timeout_s=timeout_s,
            allow_unreachable=allow_unreachable,
        )
        if not self.model and ids:
            self.model = ids[0]
            if not self.name:
                self.name = self.model
        return ids

    def stats(self) -> model_pb2.ModelStats:
        """In-flight and total requests; utilisation is unknown for an upstream (0.0)."""
        return model_pb2.ModelStats(
            utilisation=0.0, in_flight=self._in_flight, queued=0, requests=self._requests
        )

    @property
    def failures(self) -> int:
        """Requests that ended in an error (including cancellation) since start."""
        return self._failures

    async def close(self) -> None:
        """Close the HTTP session. Later `generate` calls raise `ModelUnavailableError`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


class _SseAttempt:
    """One streamed chat call upstream: parses the SSE events into `GenerateChunk`s
    (`sent`: whether one has been handed on; `retry_after`: the header of an error)."""

    def __init__(self, backend: OpenAIBackend, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.sent = False
        self.retry_after: float | None = None

    async def run(self, payload: bytes) -> AsyncIterator[model_pb2.GenerateChunk]:
        backend = self.backend
        url = backend.chat_url
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout_s, sock_read=self.timeout_s
        )
        try:
            async with asyncio.timeout(self.timeout_s + 1.0):  # until the answer's head
                response = await backend._get_session().post(url, data=payload, timeout=timeout)
        except TimeoutError as exc:
            raise ModelUnavailableError(
                f"POST {url} timed out after {self.timeout_s:g}s with no answer"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ModelUnavailableError(f"cannot connect to {url}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise ModelUnavailableError(
                f"POST {url} failed: {str(exc) or type(exc).__name__}"
            ) from exc
        try:
            if response.status >= 400:
                self.retry_after = parse_retry_after(response.headers.get("Retry-After"))
                raw = await self._read(response)
                _raise_for_status(url, response.status, raw)
            async for chunk in self._events(response):
                yield chunk
                self.sent = True
        finally:
            response.close()

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ModelUnavailableError(f"{self.backend.chat_url}: no error body: {exc}") from exc

    def _broken(self, why: str) -> ModelUnavailableError:
        where = "after the stream began" if self.sent else "before any token"
        return ModelUnavailableError(f"{self.backend.chat_url}: stream failed {where}: {why}")

    async def _events(
        self, response: aiohttp.ClientResponse
    ) -> AsyncIterator[model_pb2.GenerateChunk]:
        backend = self.backend
        url = backend.chat_url
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[float] = []
        prompt_ids: list[int] = []
        calls: dict[int, dict[str, str]] = {}
        finish = ""
        role = "assistant"
        usage: Any = None
        done = False
        try:
            async for raw_line in response.content:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank lines, comments, `event:` fields
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise self._broken(f"malformed event {_excerpt(data)!r}") from exc
                if not isinstance(event, dict):
                    raise self._broken(f"malformed event {_excerpt(data)!r}")
                if "error" in event:
                    raise self._broken(f"error event: {_upstream_error_message(data)}")
                usage = event.get("usage") or usage
                prompt_ids = prompt_ids or _int_list(event.get("prompt_token_ids"))
                choices = event.get("choices") or []
                choice = choices[0] if isinstance(choices, list) and choices else None
                if not isinstance(choice, dict):
                    continue
                finish = str(choice.get("finish_reason") or finish)
                delta = choice.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                role = str(delta.get("role") or role)
                piece = delta.get("content")
                piece = piece if isinstance(piece, str) else ""
                for raw_call in delta.get("tool_calls") or []:
                    if not isinstance(raw_call, dict):
                        raise self._broken(f"malformed tool call delta {raw_call!r}")
                    slot = calls.setdefault(
                        int(raw_call.get("index", len(calls))), {"id": "", "name": "", "args": ""}
                    )
                    slot["id"] = str(raw_call.get("id") or slot["id"])
                    function = raw_call.get("function") or {}
                    slot["name"] += str(function.get("name") or "")
                    slot["args"] += str(function.get("arguments") or "")
                new_ids, new_logprobs = _completion_tokens(choice)
                if piece or new_ids or new_logprobs:
                    text.append(piece)
                    ids.extend(new_ids)
                    logprobs.extend(new_logprobs)
                    yield model_pb2.GenerateChunk(
                        text=piece, token_ids=new_ids, logprobs=new_logprobs
                    )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._broken(str(exc) or type(exc).__name__) from exc
        if not done:
            raise self._broken("the stream ended before `data: [DONE]`")
        tool_calls = _tool_calls_from_openai(
            url,
            [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["args"]},
                }
                for _, c in sorted(calls.items())
            ],
        )
        final = model_pb2.GenerateResponse(
            prompt_token_ids=prompt_ids,
            completion_token_ids=ids,
            completion_logprobs=logprobs,
            message=common_pb2.ChatMessage(role=role, content="".join(text), tool_calls=tool_calls),
            model=backend.name,
            model_version=backend.version,
            prompt_tokens=_token_count(usage, "prompt_tokens"),
            completion_tokens=_token_count(usage, "completion_tokens"),
            finish_reason=finish,
        )
        yield model_pb2.GenerateChunk(final=final)
