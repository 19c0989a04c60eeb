"""The built-in tool-calling agent: one task, one environment, one model.

    create environment → [model turn → tool calls → observations]* → submit → release

With a `CheckpointWriter` it checkpoints its state every `checkpoint_every` turns, and
with `resume` (an earlier attempt's checkpoint) it restores the environment by
replaying the recorded actions and continues the conversation where it stopped (see
`megaflow.agent.checkpoint`).

Outcomes the task is responsible for (step or token limit, the whole-task deadline)
are returned as a failed result with `ERROR_KIND_TASK` and reward 0. Failures of the
platform (sandbox, model, unreachable services) propagate as `InfrastructureError`,
for the scheduler to retry: they are never scored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass

from megaflow.agent import tools
from megaflow.agent.checkpoint import (
    REPLAY,
    CheckpointWriter,
    Encoded,
    Mark,
    ReplayMismatch,
    StaleAttemptError,
    check_resumable,
    conversation,
    encode,
    replay,
)
from megaflow.contract import EnvironmentService, ModelService
from megaflow.core.errors import MegaFlowError
from megaflow.core.runtime import coarse_timeout
from megaflow.v1 import agent_pb2, common_pb2, env_pb2, model_pb2

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a careful software engineer. The repository is in /workspace and your shell "
    "starts there. Fix the problem described by the user. Use the `bash` tool to inspect "
    "and test, `edit_file` to change files, and call `submit` when you are done."
)
NO_TOOL_NUDGE = "Please answer with exactly one tool call: bash, edit_file or submit."
RELEASE_OWNED_TIMEOUT_S = 5.0
"""How long an attempt whose CreateEnvironment failed waits to undo it."""


@dataclass(frozen=True)
class AgentLimits:
    """Defaults for budgets a task leaves at zero."""

    max_steps: int = 30
    max_tokens: int = 200_000
    step_timeout_s: float = 60.0
    setup_timeout_s: float = 60.0
    task_timeout_s: float = 1800.0
    scoring_timeout_s: float = 120.0
    max_completion_tokens: int = 1024


class _TaskOutcome(Exception):
    """Ends the loop with a task-caused outcome."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ToolAgent:
    """Runs one task to a result and a trajectory."""

    def __init__(
        self,
        task: common_pb2.TaskSpec,
        attempt_id: str,
        *,
        env: EnvironmentService,
        model: ModelService,
        limits: AgentLimits,
        checkpoints: CheckpointWriter | None = None,
        checkpoint_every: int = 1,
        resume: common_pb2.AgentCheckpoint | None = None,
    ) -> None:
        self.task = task
        self.attempt_id = attempt_id
        self.env = env
        self.model = model
        b = task.budgets
        self.max_steps = b.max_steps or limits.max_steps
        self.max_tokens = b.max_tokens or limits.max_tokens
        self.step_timeout_s = b.step_timeout_s or limits.step_timeout_s
        self.setup_timeout_s = b.setup_timeout_s or limits.setup_timeout_s
        self.task_timeout_s = b.task_timeout_s or limits.task_timeout_s
        self.scoring_timeout_s = b.scoring_timeout_s or limits.scoring_timeout_s
        self.max_completion_tokens = limits.max_completion_tokens
        # Built in place inside the response the Agent Service returns: no copy at the end.
        self.response = agent_pb2.RunTaskResponse()
        self.result = self.response.result
        self.result.task_id, self.result.attempt_id = task.task_id, attempt_id
        self.trajectory = self.response.trajectory
        self.trajectory.task_id, self.trajectory.attempt_id = task.task_id, attempt_id
        self.resume = resume
        self._writer = checkpoints if checkpoint_every > 0 else None
        self._every = checkpoint_every
        self._mark: Mark | None = None
        self._encoded = Encoded()
        self._elapsed0 = 0.0  # task time used by earlier attempts
        self._pending: list[common_pb2.ChatMessage] = []
        self._task: asyncio.Task[object] | None = None
        self._looping = False
        self._stale = False

    @property
    def task_id(self) -> str:
        return self.task.task_id

    # -- checkpoints (see megaflow.agent.checkpoint) ---------------------------------------
    def checkpoint_bytes(self) -> bytes:
        """The latest marked state as a serialised `AgentCheckpoint`."""
        assert self._mark is not None
        return encode(self.trajectory, self._mark, self._encoded)

    def on_stale(self) -> None:
        """The store refused our checkpoint: another attempt owns the task. Stop."""
        self._stale = True
        if self._looping and self._task is not None and not self._task.done():
            log.warning(
                "attempt %s is no longer current (checkpoint refused): stopping", self.attempt_id
            )
            self._task.cancel()

    def _checkpoint(self, pending: list[common_pb2.ChatMessage], started: float) -> None:
        assert self._writer is not None
        turns = self.trajectory.turns
        self._mark = Mark(
            turns=len(turns),
            pending=pending,
            prompt_tokens=self.result.prompt_tokens,
            completion_tokens=self.result.completion_tokens,
            elapsed_s=self._elapsed0 + time.monotonic() - started,
            model_version=turns[-1].model_version,
        )
        self._writer.offer(self)

    async def run(self) -> tuple[common_pb2.TaskResult, common_pb2.Trajectory]:
        self._task = asyncio.current_task()
        try:
            return await self._run()
        except asyncio.CancelledError:
            if self._stale and self._task is not None and self._task.uncancel() == 0:
                raise StaleAttemptError(
                    f"attempt {self.attempt_id} is no longer current (its checkpoint was "
                    "refused); stopped"
                ) from None
            raise

    async def _create(self) -> str:
        request = env_pb2.CreateEnvironmentRequest(
            owner=self.attempt_id,
            image=self.task.image,
            files=self.task.files,
            hidden_files=self.task.hidden_files,
            eval_command=self.task.eval_command,
            limits=self.task.limits,
            setup_timeout_s=self.setup_timeout_s,
            lease_s=self.task_timeout_s + self.scoring_timeout_s + 60.0,
            placement=self.task.placement,
            workspace=self.task.workspace if self.task.HasField("workspace") else None,
            setup_commands=self.task.setup_commands,
        )
        try:
            created = await self.env.create_environment(request)
        except BaseException:
            # Cancelled or failed in flight: the service may have made the environment
            # all the same (the answer lost), and this attempt never learns its id.
            await asyncio.shield(self._release_owned())
            raise
        return created.env_id

    async def _release(self, env_id: str) -> None:
        with contextlib.suppress(MegaFlowError, OSError, asyncio.TimeoutError):
            await self.env.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))

    async def _release_owned(self) -> None:
        """Release whatever the Environment Service holds for this attempt (best effort:
        the lease reaper is the backstop)."""
        with contextlib.suppress(MegaFlowError, OSError, asyncio.TimeoutError):
            async with asyncio.timeout(RELEASE_OWNED_TIMEOUT_S):
                request = env_pb2.ReleaseEnvironmentRequest(owner=self.attempt_id)
                await self.env.release_environment(request)

    async def _run(self) -> tuple[common_pb2.TaskResult, common_pb2.Trajectory]:
        started = time.monotonic()
        env_id = await self._create()
        if self.resume is not None:
            try:
                env_id = await self._resume(env_id, self.resume)
            except BaseException:
                await self._release(env_id)
                raise
        self.result.setup_s = time.monotonic() - started
        try:
            try:
                self._looping = True
                # coarse: tens of thousands of far deadlines share a few timer handles
                async with coarse_timeout(max(self.task_timeout_s - self._elapsed0, 0.0)):
                    await self._loop(env_id)
            except TimeoutError:
                self._fail(f"task deadline of {self.task_timeout_s:.0f}s passed")
            except _TaskOutcome as outcome:
                self._fail(str(outcome))
            except BaseException:
                # An infrastructure error or a cancellation: the next attempt resumes from
                # the latest checkpoint, so make it durable before reporting.
                self._looping = False
                await self._flush()
                raise
            finally:
                self._looping = False
                if self._writer is not None:
                    self._writer.discard(self)  # the result supersedes it
        finally:
            released = time.monotonic()
            await self._release(env_id)
            self.result.teardown_s = time.monotonic() - released
        self.result.duration_s = time.monotonic() - started
        self.result.steps = len(self.trajectory.turns)
        return self.result, self.trajectory

    async def _flush(self) -> None:
        if self._writer is None or self._stale or self._mark is None:
            return
        try:
            async with asyncio.timeout(self._writer.config.flush_timeout_s):
                await self._writer.flush(self)
        except TimeoutError:
            log.warning("checkpoint of %s not flushed in time", self.attempt_id)

    async def _resume(self, env_id: str, checkpoint: common_pb2.AgentCheckpoint) -> str:
        """Restore `checkpoint` into the fresh environment `env_id`; on a mismatch, start
        over in another fresh environment. Returns the environment to continue in."""
        t0 = time.monotonic()
        try:
            check_resumable(checkpoint, self.task.task_id, self.max_steps)
            replayed = await replay(checkpoint.trajectory, functools.partial(self._act, env_id))
        except ReplayMismatch as mismatch:
            log.warning(
                "attempt %s cannot resume from %s's checkpoint (%s): starting over",
                self.attempt_id,
                checkpoint.attempt_id,
                mismatch,
            )
            await self._release(env_id)
            return await self._create()
        trajectory = self.trajectory
        trajectory.CopyFrom(checkpoint.trajectory)
        trajectory.attempt_id = self.attempt_id
        if not trajectory.messages:  # checkpoints leave it out: the turns hold it
            trajectory.messages.extend(conversation(trajectory.turns))
        trajectory.resumptions.add(
            at_turn=len(trajectory.turns),
            from_attempt_id=checkpoint.attempt_id,
            attempt_id=self.attempt_id,
            method=REPLAY,
            replayed_actions=replayed,
            restore_s=time.monotonic() - t0,
        )
        self._pending = list(checkpoint.pending)
        self.result.prompt_tokens = checkpoint.prompt_tokens
        self.result.completion_tokens = checkpoint.completion_tokens
        self._elapsed0 = checkpoint.elapsed_s
        log.info(
            "attempt %s resumed %s at turn %d (%d actions replayed)",
            self.attempt_id,
            checkpoint.attempt_id,
            len(trajectory.turns),
            replayed,
        )
        return env_id

    def _fail(self, message: str) -> None:
        self.result.state = common_pb2.TASK_STATE_FAILED
        self.result.error_kind = common_pb2.ERROR_KIND_TASK
        self.result.error = message
        self.result.has_reward = True
        self.result.reward = 0.0

    async def _loop(self, env_id: str) -> None:
        started = time.monotonic()
        messages = self.trajectory.messages
        start = len(self.trajectory.turns)  # > 0 when resumed from a checkpoint
        if start:
            pending = self._pending
        else:
            pending = [
                common_pb2.ChatMessage(role="system", content=SYSTEM_PROMPT),
                common_pb2.ChatMessage(role="user", content=self.task.problem_statement),
            ]
        # One request, grown turn by turn: the conversation is not copied on every call.
        request = model_pb2.GenerateRequest(
            task_id=self.task.task_id,
            model=self.task.model,
            tools=tools.tool_specs(),
            max_tokens=self.max_completion_tokens,
            messages=messages,
        )
        writer, every = self._writer, self._every
        for index in range(start, self.max_steps):
            messages.extend(pending)
            request.messages.extend(pending)
            turn = self.trajectory.turns.add(index=index, prompt_delta=pending)
            t0 = time.monotonic()
            response = await self.model.generate(request)
            turn.model_latency_s = time.monotonic() - t0
            turn.response.CopyFrom(response.message)
            turn.model_version = response.model_version
            turn.prompt_tokens = response.prompt_tokens
            turn.completion_tokens = response.completion_tokens
            turn.prompt_token_ids.extend(response.prompt_token_ids)
            turn.completion_token_ids.extend(response.completion_token_ids)
            turn.completion_logprobs.extend(response.completion_logprobs)
            turn.replica = response.replica
            self.result.prompt_tokens += response.prompt_tokens
            self.result.completion_tokens += response.completion_tokens
            messages.append(response.message)
            request.messages.append(response.message)
            t1 = time.monotonic()
            pending = []
            if not response.message.tool_calls:
                pending.append(common_pb2.ChatMessage(role="user", content=NO_TOOL_NUDGE))
            for call in response.message.tool_calls:
                text, done = await self._act(env_id, call)
                observation = common_pb2.ChatMessage(
                    role="tool", content=text, tool_call_id=call.id, name=call.name
                )
                turn.observations.append(observation)
                if done:
                    messages.append(observation)
                    turn.env_latency_s = time.monotonic() - t1
                    return
                pending.append(observation)
            turn.env_latency_s = time.monotonic() - t1
            used = self.result.prompt_tokens + self.result.completion_tokens
            if used > self.max_tokens:
                messages.extend(pending)
                raise _TaskOutcome(f"token limit of {self.max_tokens} reached ({used} used)")
            if writer is not None and (index + 1) % every == 0:
                self._checkpoint(pending, started)
        messages.extend(pending)
        raise _TaskOutcome(f"step limit of {self.max_steps} reached without submitting")

    async def _act(self, env_id: str, call: common_pb2.ToolCall) -> tuple[str, bool]:
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
            step = await self.env.execute_step(
                env_pb2.ExecuteStepRequest(
                    env_id=env_id, command=command, timeout_s=self.step_timeout_s
                )
            )
            text = step.output
            if step.timed_out:
                text += f"\n[command timed out after {self.step_timeout_s:.0f}s and was killed]"
            elif step.exit_code != 0:
                text += f"\n[exit code {step.exit_code}]"
            return text, False
        if call.name == tools.EDIT_FILE:
            fields = [args.get(k) for k in ("path", "old", "new")]
            if not all(isinstance(v, str) for v in fields):
                return "error: edit_file needs string `path`, `old` and `new`", False
            path, old, new = (str(v) for v in fields)
            reply = await self.env.submit_action(
                env_pb2.SubmitActionRequest(
                    env_id=env_id, edit_file=env_pb2.EditFile(path=path, old=old, new=new)
                )
            )
            return (reply.message if reply.ok else f"error: {reply.message}"), False
        if call.name == tools.SUBMIT:
            reply = await self.env.submit_action(
                env_pb2.SubmitActionRequest(
                    env_id=env_id, submit=env_pb2.Submit(scoring_timeout_s=self.scoring_timeout_s)
                )
            )
            self.result.state = common_pb2.TASK_STATE_SUCCEEDED
            self.result.has_reward = reply.has_reward
            self.result.reward = reply.reward
            self.result.eval_output = reply.eval_output
            return reply.message, True
        return f"error: unknown tool {call.name!r}; use bash, edit_file or submit", False
