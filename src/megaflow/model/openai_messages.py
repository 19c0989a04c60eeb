"""ChatMessage, ToolCall and ToolSpec to and from OpenAI's chat JSON: the one codec
that both the `openai` backend (a client of an OpenAI-compatible server) and the
gateway (such a server) use.

The parsers return None for a value that is not of the expected shape: each caller
raises its own error (the gateway: a 400 naming the field; the backend: the upstream
answered something malformed).
"""

from __future__ import annotations

import json
from typing import Any

from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import common_pb2

__all__ = [
    "arguments_json",
    "message_to_openai",
    "tool_call_from_openai",
    "tool_from_openai",
    "tool_to_openai",
]


def message_to_openai(message: common_pb2.ChatMessage) -> dict[str, Any]:
    """A message in OpenAI's shape: role (assistant if unset), content (null when an
    assistant turn only calls tools), tool calls, tool_call_id and name when set."""
    out: dict[str, Any] = {"role": message.role or "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
            }
            for call in message.tool_calls
        ]
        if not message.content:
            out["content"] = None
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def arguments_json(arguments: Any) -> str:
    """A tool call's arguments as JSON text: ``{}`` when absent; some servers and
    clients send the object itself instead of its text."""
    if arguments is None:
        return "{}"
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def tool_call_from_openai(raw: Any) -> common_pb2.ToolCall | None:
    """``{"id", "function": {"name", "arguments"}}`` as a ToolCall; None when ``raw``
    has no ``function`` object."""
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict):
        return None
    return common_pb2.ToolCall(
        id=str(raw.get("id") or ""),
        name=str(function.get("name") or ""),
        arguments_json=arguments_json(function.get("arguments")),
    )


def tool_to_openai(spec: common_pb2.ToolSpec) -> dict[str, Any]:
    """``{"type": "function", "function": {...}}``; an empty schema becomes an object
    without properties. InvalidRequestError if the schema is not JSON."""
    parameters: Any = {"type": "object", "properties": {}}
    if spec.parameters_json_schema:
        try:
            parameters = json.loads(spec.parameters_json_schema)
        except ValueError as exc:
            raise InvalidRequestError(
                f"tool {spec.name!r}: parameters_json_schema is not valid JSON: {exc}"
            ) from exc
    function: dict[str, Any] = {"name": spec.name, "parameters": parameters}
    if spec.description:
        function["description"] = spec.description
    return {"type": "function", "function": function}


def tool_from_openai(raw: Any) -> common_pb2.ToolSpec | None:
    """A ToolSpec from ``{"type": "function", "function": {"name", ...}}``; None when
    there is no function object with a string name."""
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    parameters = function.get("parameters")
    return common_pb2.ToolSpec(
        name=function["name"],
        description=str(function.get("description") or ""),
        parameters_json_schema=json.dumps(parameters) if parameters is not None else "",
    )
