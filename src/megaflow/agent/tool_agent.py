"""The built-in scaffold: a tool-calling agent (`bash`, `edit_file`, `submit`).

    [model turn → tool calls → observations]* → submit

Its prompts are in its config (`ToolAgentConfig`), so a task can change them
(``TaskSpec.scaffold = {type: "tool-agent", config_json: '{"system_prompt": ...}'}``).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from megaflow.agent import tools
from megaflow.agent.session import TaskSession
from megaflow.v1 import common_pb2

SYSTEM_PROMPT = (
    "You are a careful software engineer. The repository is in /workspace and your shell "
    "starts there. Fix the problem described by the user. Use the `bash` tool to inspect "
    "and test, `edit_file` to change files, and call `submit` when you are done."
)
NO_TOOL_NUDGE = "Please answer with exactly one tool call: bash, edit_file or submit."


class ToolAgentConfig(BaseModel):
    """Settings of the built-in tool agent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str = Field(default=SYSTEM_PROMPT, description="The first (system) message.")
    nudge: str = Field(
        default=NO_TOOL_NUDGE,
        description="Sent when the model answers without a tool call.",
    )


class ToolAgentScaffold:
    """The built-in agent: the model calls tools until it calls `submit`."""

    Config = ToolAgentConfig

    def __init__(self, config: ToolAgentConfig | None = None) -> None:
        self.config = config or ToolAgentConfig()

    async def run(self, session: TaskSession) -> None:
        session.set_tools(tools.tool_specs())
        pending = [
            common_pb2.ChatMessage(role="system", content=self.config.system_prompt),
            common_pb2.ChatMessage(role="user", content=session.task.problem_statement),
        ]
        while True:
            reply = await session.generate(pending)
            pending = []
            if not reply.tool_calls:
                pending.append(common_pb2.ChatMessage(role="user", content=self.config.nudge))
            for call in reply.tool_calls:
                text, done = await self._act(session, call)
                observation = common_pb2.ChatMessage(
                    role="tool", content=text, tool_call_id=call.id, name=call.name
                )
                session.observe(observation)
                if done:
                    session.record_messages([observation])
                    return
                pending.append(observation)

    async def _act(self, session: TaskSession, call: common_pb2.ToolCall) -> tuple[str, bool]:
        """Perform one tool call; return the observation and whether the task is done."""
        try:
            args = json.loads(call.arguments_json or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as error:
            return f"error: invalid arguments for {call.name}: {error}", False
        if call.name == tools.BASH:
            command = args.get("command")
            if not isinstance(command, str) or not command.strip():
                return "error: bash needs a non-empty string `command`", False
            step = await session.execute(command)
            text = step.output
            if step.timed_out:
                text += f"\n[command timed out after {session.step_timeout_s:.0f}s and was killed]"
            elif step.exit_code != 0:
                text += f"\n[exit code {step.exit_code}]"
            return text, False
        if call.name == tools.EDIT_FILE:
            fields = [args.get(k) for k in ("path", "old", "new")]
            if not all(isinstance(v, str) for v in fields):
                return "error: edit_file needs string `path`, `old` and `new`", False
            path, old, new = (str(v) for v in fields)
            reply = await session.edit(path, old, new)
            return (reply.message if reply.ok else f"error: {reply.message}"), False
        if call.name == tools.SUBMIT:
            reply = await session.submit()
            return reply.message, True
        return f"error: unknown tool {call.name!r}; use bash, edit_file or submit", False
