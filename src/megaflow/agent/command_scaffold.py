"""The ``command`` scaffold: any CLI agent, run inside the task's sandbox.

    TaskSpec.scaffold = {type: "command", config_json: '{"command": "my-agent --yes"}'}
    TaskSpec.scaffold = {type: "qwen-code"}     # Qwen Code (npm), preconfigured

As Harbor and Terminal-bench run CLI agents: the command runs once, in the sandbox's
persistent shell (in a subshell: nothing it exports stays), with the problem statement
in ``$MEGAFLOW_PROBLEM`` and an OpenAI-compatible model endpoint in ``$OPENAI_BASE_URL``
(``$OPENAI_API_KEY`` the task's key, ``$OPENAI_MODEL`` the task's model). When it ends,
the hidden tests score the workspace (`TaskSession.submit`).

The sandbox has no network. The endpoint is the task's own (`TaskModelEndpoint`): a
unix socket the agent serves in the sandbox's ``/run/megaflow``, which a forwarder in the
sandbox (``socat``) offers as ``127.0.0.1:<port>``. Every model call is a turn of the
task's session: recorded with token ids and logprobs, counted against the step and
token budgets. The CLI reaches nothing else.

How a task ends:

- the command exits 0: the hidden tests give the reward;
- it exits non-zero: a task failure with reward 0 naming the exit code and the end of
  its output (``score_on_failure``: score it anyway);
- it runs past ``timeout_s`` (default: the task's whole deadline): killed, a task failure
  "did not finish within";
- the step or token budget runs out on a model call: the command is stopped and the task
  fails with that budget's message; a model failure (an infrastructure error) is retried
  by the scheduler like any other.
"""

from __future__ import annotations

import asyncio
import re
import shlex

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megaflow.agent.model_endpoint import TaskModelEndpoint
from megaflow.agent.session import TaskOutcome, TaskSession

AGENT_PREFIX = "/opt/megaflow/npm"
"""Where ``./dev`` installs CLI agents from npm (its ``bin`` is on the command's PATH)."""

QWEN_CODE_COMMAND = (
    'qwen --bare --auth-type openai --model "$OPENAI_MODEL" --approval-mode yolo '
    '--chat-recording=false "$MEGAFLOW_PROBLEM"'
)
"""Qwen Code, non-interactive (``@qwen-code/qwen-code``, pinned by ``./dev``)."""


class CommandConfig(BaseModel):
    """Settings of the command scaffold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command: str = Field(
        min_length=1,
        description="Shell command line run in the sandbox (bash), from the workdir.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="More environment variables for the command."
    )
    timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="Kill the command past this; 0: the task's deadline decides.",
    )
    port: int = Field(
        default=18080, ge=1024, le=65535, description="Sandbox-local port of the endpoint."
    )
    path: list[str] = Field(
        default_factory=lambda: [f"{AGENT_PREFIX}/bin"],
        description="Folders (inside the sandbox) put first on the command's PATH.",
    )
    score_on_failure: bool = Field(
        default=False,
        description="Score the workspace even when the command exits non-zero.",
    )
    output_tail: int = Field(
        default=2000, ge=0, description="Characters of output quoted in a failure message."
    )

    @field_validator("env")
    @classmethod
    def _names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        return env


class QwenCodeConfig(CommandConfig):
    """The command scaffold preset for Qwen Code."""

    command: str = Field(default=QWEN_CODE_COMMAND, min_length=1)


_FORWARD = """\
if ! command -v socat >/dev/null; then
  echo "megaflow: socat is not in the sandbox image: the model endpoint needs it" >&2; exit 127
fi
mkdir -p "$HOME"
socat TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{socket} 2>/dev/null &
__mf_fwd=$!
for __mf_i in $(seq 100); do
  (: >/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.02
done
"""


class CommandScaffold:
    """Runs `CommandConfig.command` in the sandbox against the task's model endpoint."""

    Config = CommandConfig

    def __init__(self, config: CommandConfig) -> None:
        self.config = config

    def script(self, session: TaskSession, endpoint: TaskModelEndpoint) -> str:
        """The shell script the sandbox runs (a subshell around the command)."""
        c = self.config
        env = {
            "OPENAI_BASE_URL": f"http://127.0.0.1:{c.port}/v1",
            "OPENAI_MODEL": session.task.model or "default",
            "MEGAFLOW_PROBLEM": session.task.problem_statement,
            "MEGAFLOW_TASK_ID": session.task_id,
            "MEGAFLOW_MAX_STEPS": str(session.max_steps),
            "HOME": "/tmp/megaflow-home",
            "NO_PROXY": "127.0.0.1,localhost",
            **c.env,
        }
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        # the key from its file: no recorded command line carries it
        exports += f'export OPENAI_API_KEY="$(cat {shlex.quote(endpoint.sandbox_key_file)})"\n'
        path = "".join(f"{shlex.quote(p)}:" for p in c.path)
        forward = _FORWARD.format(port=c.port, socket=shlex.quote(endpoint.sandbox_socket))
        return (
            f'(\n{exports}export PATH={path}"$PATH"\n{forward}'
            f"cd {shlex.quote(session.workdir or '/workspace')}\n{c.command}\n__mf_rc=$?\n"
            'kill "$__mf_fwd" 2>/dev/null; wait "$__mf_fwd" 2>/dev/null\n'
            'exit "$__mf_rc"\n)'
        )

    async def run(self, session: TaskSession) -> None:
        c = self.config
        timeout_s = c.timeout_s or session.task_timeout_s
        async with TaskModelEndpoint(session) as endpoint:
            command = asyncio.ensure_future(
                session.execute(self.script(session, endpoint), timeout_s=timeout_s)
            )
            stopped = asyncio.ensure_future(endpoint.failed.wait())
            try:
                await asyncio.wait({command, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not command.done():  # the model side ended the task: stop the CLI
                    command.cancel()
                    await asyncio.wait({command})
            if endpoint.error is not None:
                raise endpoint.error
            step = command.result()
        if step.timed_out:
            raise TaskOutcome(f"the agent command did not finish within {timeout_s:.0f}s")
        if step.exit_code != 0 and not c.score_on_failure:
            tail = step.output[-c.output_tail :] if c.output_tail else ""
            raise TaskOutcome(f"the agent command exited with {step.exit_code}: {tail.strip()}")
        await session.submit()


class QwenCodeScaffold(CommandScaffold):
    """Qwen Code (``@qwen-code/qwen-code`` from npm) as a command scaffold."""

    Config = QwenCodeConfig
