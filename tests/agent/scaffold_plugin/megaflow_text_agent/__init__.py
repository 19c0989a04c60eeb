"""A scaffold in the style of mini-swe-agent: no tool calls; the model answers in text
with one ```bash block, which runs in the shell; a block holding only the submit word
ends the task."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from megaflow import TaskOutcome, TaskSession
from megaflow.v1.common_pb2 import ChatMessage

BLOCK = re.compile(r"```bash\n(.*?)\n```", re.DOTALL)


class TextAgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str = "Answer with exactly one ```bash block. Run SUBMIT when done."
    submit_word: str = "SUBMIT"
    max_format_errors: int = 2


class TextAgent:
    Config = TextAgentConfig

    def __init__(self, config: TextAgentConfig) -> None:
        self.config = config

    async def run(self, session: TaskSession) -> None:
        pending = [
            ChatMessage(role="system", content=self.config.system_prompt),
            ChatMessage(role="user", content=session.task.problem_statement),
        ]
        errors = 0
        while True:
            reply = await session.generate(pending)
            blocks = BLOCK.findall(reply.content)
            if len(blocks) != 1:
                errors += 1
                if errors > self.config.max_format_errors:
                    raise TaskOutcome("the model kept answering without one bash block")
                pending = [ChatMessage(role="user", content="Exactly one ```bash block, please.")]
                continue
            command = blocks[0].strip()
            if command == self.config.submit_word:
                result = await session.submit()
                session.record_messages([ChatMessage(role="user", content=result.message)])
                return
            step = await session.execute(command)
            observation = ChatMessage(
                role="user", content=f"<exit>{step.exit_code}</exit>\n{step.output}"
            )
            session.observe(observation)
            pending = [observation]
