"""`ScriptedBackend`: a model backend that replays a script, for tests.

Each entry of the script is either an assistant `ChatMessage` to return or an
exception to raise, so tests can make a model misbehave or fail on cue. Calls are
counted per task. Scripts are per task id (`by_task`) or shared (`default`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable

from megaflow.v1 import common_pb2, model_pb2

Step = common_pb2.ChatMessage | BaseException
Script = Callable[[str, int], Step]


def tool_call(name: str, **arguments: object) -> common_pb2.ChatMessage:
    """An assistant message with one tool call."""
    return common_pb2.ChatMessage(
        role="assistant",
        tool_calls=[
            common_pb2.ToolCall(id=f"call-{name}", name=name, arguments_json=json.dumps(arguments))
        ],
    )


class ScriptedBackend:
    kind = "scripted"

    def __init__(self, script: Script, name: str = "scripted", version: str = "script-1") -> None:
        self.name = name
        self.version = version
        self.script = script
        self.calls: dict[str, int] = defaultdict(int)

    async def generate(self, request: model_pb2.GenerateRequest) -> model_pb2.GenerateResponse:
        index = self.calls[request.task_id]
        self.calls[request.task_id] += 1
        step = self.script(request.task_id, index)
        if isinstance(step, BaseException):
            raise step
        return model_pb2.GenerateResponse(
            message=step,
            model=self.name,
            model_version=self.version,
            prompt_tokens=10,
            completion_tokens=5,
        )

    def stats(self) -> model_pb2.ModelStats:
        return model_pb2.ModelStats(requests=sum(self.calls.values()))

    async def close(self) -> None:
        return None
