"""OpenAI JSON <-> MegaFlow protobuf, for the gateway (`megaflow.model.gateway`).

Requests: `chat_request` turns a `/v1/chat/completions` body into a `GenerateRequest`;
`completion_request` turns a `/v1/completions` body into one with a single user
message holding the prompt (the Model Service only serves chats). Anything malformed
raises `InvalidRequestError` (HTTP 400).

Responses: `chat_body` / `completion_body` build the non-streaming answers, built as
dicts straight from the response (no protobuf JSON round trip). A streamed answer is
encoded by a `StreamEncoder` (`ChatStream`, `CompletionStream`): it turns each
`GenerateChunk` of the Model Service's stream into the SSE `data:` payloads of the
OpenAI API as it arrives: a role chunk, content deltas, then (with the last chunk) the
tool calls, the finish reason and, with `stream_options.include_usage`, the usage.
Token ids travel as vLLM does it: with `"return_token_ids": true` in the request the answer carries
`prompt_token_ids` at the top and `token_ids` in the choice; with `"logprobs": true`
the choice carries `logprobs.content` with one entry per completion token, named
`token_id:<id>` (the gateway has no tokenizer to spell tokens with). Streamed, each
chunk carries the ids and logprobs of the tokens that arrived with it (tokens without
text, e.g. of tool calls, ride on the next chunk sent).
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

import orjson

from megaflow.core.errors import InvalidRequestError
from megaflow.model.openai_messages import (
    message_to_openai,
    tool_call_from_openai,
    tool_from_openai,
)
from megaflow.v1 import common_pb2, model_pb2

__all__ = [
    "ChatStream",
    "CompletionStream",
    "StreamEncoder",
    "chat_body",
    "chat_request",
    "completion_body",
    "completion_request",
]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# Answer ids: unique per process start (random prefix) and per answer (counter), without
# a urandom call per request as uuid4 makes.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def _text(value: Any, where: str) -> str:
    """Message content: a string, null, or a list of content parts (text parts kept)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise InvalidRequestError(f"{where}: only text content parts are supported")
        return "".join(parts)
    raise InvalidRequestError(f"{where}: content must be a string or a list of parts")


def _add_message(messages: Any, raw: Any, i: int) -> None:
    """Append `raw` (an OpenAI message) to `messages` (a repeated ChatMessage field),
    built in place: no message object is built and then copied in."""
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"messages[{i}] must be an object")
    role = raw.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}"
        )
    content = raw.get("content")
    message = messages.add(
        role="system" if role == "developer" else role,
        content=content if type(content) is str else _text(content, f"messages[{i}]"),
    )
    name, tool_call_id, calls = raw.get("name"), raw.get("tool_call_id"), raw.get("tool_calls")
    if name:
        message.name = str(name)
    if tool_call_id:
        message.tool_call_id = str(tool_call_id)
    if not calls:
        return
    if not isinstance(calls, list):
        raise InvalidRequestError(f"messages[{i}].tool_calls must be a list")
    for j, raw_call in enumerate(calls):
        call = tool_call_from_openai(raw_call)
        if call is None or not isinstance(raw_call["function"].get("name"), str):
            raise InvalidRequestError(f"messages[{i}].tool_calls[{j}] needs function.name")
        message.tool_calls.append(call)


# An agent offers the same tools on every call: their specs are built once per distinct
# list (keyed by its JSON), not once per call.
_TOOLS_CACHE: dict[bytes, tuple[common_pb2.ToolSpec, ...]] = {}
_TOOLS_CACHE_MAX = 256


def _tools(raw: list[Any]) -> tuple[common_pb2.ToolSpec, ...]:
    try:
        key = orjson.dumps(raw)
    except TypeError:  # not JSON-clean (cannot come from a parsed body): no caching
        key = b""
    specs = _TOOLS_CACHE.get(key) if key else None
    if specs is None:
        specs = tuple(_tool(t, i) for i, t in enumerate(raw))
        if key:
            if len(_TOOLS_CACHE) >= _TOOLS_CACHE_MAX:
                _TOOLS_CACHE.clear()
            _TOOLS_CACHE[key] = specs
    return specs


def _tool(raw: Any, i: int) -> common_pb2.ToolSpec:
    spec = tool_from_openai(raw)
    if spec is None:
        raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
    return spec


def _sampling(body: dict[str, Any], request: model_pb2.GenerateRequest) -> None:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequestError("max_tokens must be a positive integer")
        request.max_tokens = max_tokens
    temperature = body.get("temperature", 1.0)  # OpenAI's default
    if temperature is None:
        temperature = 1.0
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        raise InvalidRequestError("temperature must be a number")
    if temperature < 0:
        raise InvalidRequestError("temperature must be >= 0")
    request.temperature = float(temperature)
    n = body.get("n", 1)
    if n not in (1, None):
        raise InvalidRequestError("only n=1 is supported")


def _model(body: dict[str, Any]) -> str:
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequestError("model must be a string")
    return model


def chat_request(body: Any, task_id: str) -> model_pb2.GenerateRequest:
    """A `/v1/chat/completions` body as a `GenerateRequest` for `task_id`."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list")
    request = model_pb2.GenerateRequest(task_id=task_id, model=_model(body))
    repeated = request.messages
    for i, raw in enumerate(messages):
        _add_message(repeated, raw, i)
    if tools:
        request.tools.extend(_tools(tools))
    choice = body.get("tool_choice")
    if choice is not None:
        request.tool_choice = _tool_choice(choice)
    _sampling(body, request)
    return request


def _tool_choice(raw: Any) -> str:
    """OpenAI's `tool_choice` as `GenerateRequest.tool_choice`: "auto", "none",
    "required", or {"type": "function", "function": {"name": X}} as X."""
    if raw in ("auto", "none", "required"):
        return str(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        function = raw.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return name
    raise InvalidRequestError(
        "tool_choice must be 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}"
    )


def completion_request(body: Any, task_id: str) -> model_pb2.GenerateRequest:
    """A `/v1/completions` body: the prompt becomes one user message."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string (or a list of exactly one string)")
    request = model_pb2.GenerateRequest(
        task_id=task_id,
        model=_model(body),
        messages=[common_pb2.ChatMessage(role="user", content=prompt)],
    )
    _sampling(body, request)
    return request


def _usage(response: model_pb2.GenerateResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.prompt_tokens + response.completion_tokens,
    }


def _finish(response: model_pb2.GenerateResponse) -> str:
    if response.message.tool_calls:
        return "tool_calls"
    return response.finish_reason if response.finish_reason in ("stop", "length") else "stop"


def _logprobs(response: model_pb2.GenerateResponse) -> dict[str, Any] | None:
    return _logprob_block(response.completion_token_ids, response.completion_logprobs)


def _logprob_block(ids: Any, logprobs: Any) -> dict[str, Any] | None:
    if not logprobs:
        return None
    return {
        "content": [
            {"token": f"token_id:{tid}", "logprob": lp, "bytes": None, "top_logprobs": []}
            for tid, lp in zip(ids, logprobs, strict=False)
        ]
    }


def _extras(body: dict[str, Any], response: model_pb2.GenerateResponse) -> dict[str, Any]:
    """MegaFlow/vLLM extensions asked for by the request."""
    extras: dict[str, Any] = {}
    if body.get("return_token_ids"):
        extras["prompt_token_ids"] = list(response.prompt_token_ids)
    return extras


def _envelope(kind: str, response: model_pb2.GenerateResponse) -> dict[str, Any]:
    return {
        "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{_ID_PREFIX}{next(_ID_COUNTER):012x}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": response.model,
        "system_fingerprint": response.model_version,
    }


def chat_body(body: dict[str, Any], response: model_pb2.GenerateResponse) -> dict[str, Any]:
    """A non-streaming chat completion."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": message_to_openai(response.message),
        "finish_reason": _finish(response),
        "logprobs": _logprobs(response) if body.get("logprobs") else None,
    }
    if body.get("return_token_ids"):
        choice["token_ids"] = list(response.completion_token_ids)
    return {
        **_envelope("chat", response),
        "choices": [choice],
        "usage": _usage(response),
        **_extras(body, response),
    }


def completion_body(body: dict[str, Any], response: model_pb2.GenerateResponse) -> dict[str, Any]:
    """A non-streaming text completion (the assistant's content as `text`)."""
    choice: dict[str, Any] = {
        "index": 0,
        "text": response.message.content,
        "finish_reason": _finish(response),
        "logprobs": None,
    }
    if body.get("return_token_ids"):
        choice["token_ids"] = list(response.completion_token_ids)
    return {
        **_envelope("text", response),
        "choices": [choice],
        "usage": _usage(response),
        **_extras(body, response),
    }


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


class StreamEncoder:
    """Turns a Model Service stream (`GenerateChunk`s) into OpenAI SSE payloads, chunk
    by chunk; `feed` returns the JSON payloads (without `data: ` and `[DONE]`) that a
    chunk makes."""

    kind = ""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.body = body
        self.want_logprobs = bool(body.get("logprobs"))
        self.want_ids = bool(body.get("return_token_ids"))
        self.include_usage = _include_usage(body)
        self.head: dict[str, Any] = {
            "id": f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-"
            f"{_ID_PREFIX}{next(_ID_COUNTER):012x}",
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        self._ids: list[int] = []  # tokens not sent yet (they came without text)
        self._logprobs: list[float] = []
        self.started = False

    def _take_tokens(self, choice: dict[str, Any]) -> dict[str, Any]:
        """Attach the pending tokens' ids / logprobs (as asked) to `choice`."""
        if self._ids or self._logprobs:
            if self.want_logprobs:
                choice["logprobs"] = _logprob_block(self._ids, self._logprobs)
            if self.want_ids:
                choice["token_ids"] = self._ids
            self._ids, self._logprobs = [], []
        return choice

    def _payload(self, choices: list[dict[str, Any]], **more: Any) -> bytes:
        return orjson.dumps({**self.head, "choices": choices, **more})

    def feed(self, chunk: model_pb2.GenerateChunk) -> list[bytes]:
        self._ids.extend(chunk.token_ids)
        self._logprobs.extend(chunk.logprobs)
        out = self._feed(chunk)
        if chunk.HasField("final") and self.include_usage:
            out.append(self._payload([], usage=_usage(chunk.final)))
        return out

    def _feed(self, chunk: model_pb2.GenerateChunk) -> list[bytes]:
        raise NotImplementedError

    def _final(self, response: model_pb2.GenerateResponse) -> None:
        self.head["model"] = response.model or self.head["model"]
        self.head["system_fingerprint"] = response.model_version


class ChatStream(StreamEncoder):
    """`chat.completion.chunk`s: role, content deltas, tool calls, finish (and usage)."""

    kind = "chat"

    def _choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return self._take_tokens(
            {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        )

    def _feed(self, chunk: model_pb2.GenerateChunk) -> list[bytes]:
        out = []
        final = chunk.final if chunk.HasField("final") else None
        if final is not None:
            self._final(final)
        if not self.started:
            self.started = True
            out.append(
                self._payload(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ]
                )
            )
        if chunk.text:
            out.append(self._payload([self._choice({"content": chunk.text})]))
        if final is None:
            return out
        for i, call in enumerate(final.message.tool_calls):
            delta = {
                "tool_calls": [
                    {
                        "index": i,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
                    }
                ]
            }
            out.append(self._payload([self._choice(delta)]))
        out.append(self._payload([self._choice({}, _finish(final))]))
        return out


class CompletionStream(StreamEncoder):
    """`text_completion` chunks: text deltas, then the finish (and usage)."""

    kind = "text"

    def __init__(self, body: dict[str, Any], model: str) -> None:
        super().__init__(body, model)
        self.want_logprobs = False  # (the completions API's logprobs are another shape)

    def _choice(self, text: str, finish: str | None = None) -> dict[str, Any]:
        return self._take_tokens(
            {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        )

    def _feed(self, chunk: model_pb2.GenerateChunk) -> list[bytes]:
        out = []
        if chunk.text:
            out.append(self._payload([self._choice(chunk.text)]))
        if chunk.HasField("final"):
            self._final(chunk.final)
            out.append(self._payload([self._choice("", _finish(chunk.final))]))
        return out
