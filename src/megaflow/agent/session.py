"""A task's platform session: what MegaFlow guarantees around any agent scaffold.

    session = TaskSession(task, attempt_id, env=..., model=..., limits=..., scaffold=...)
    result, trajectory = await session.run()

`run` creates the task's environment, runs the scaffold (`megaflow.agent.scaffold`)
inside the whole-task deadline, and always releases the environment. The scaffold
decides what to do next and acts only through the session:

    generate(messages)            one model turn (messages = what is new since the last)
    execute(command)              a shell command in the environment's persistent shell
    edit / write / read           file actions
    submit()                      the evaluation: the task's reward
    observe(message)              note a tool result on the current turn

and the session does the rest: budgets (steps, tokens, each command, the task), the
turn record with the exact token ids and logprobs the model produced and the model
version of each turn, every environment action with what it returned
(`SessionAction`), checkpoints to the store, and the outcome's classification.

Outcomes the task is responsible for (step or token limit, the whole-task deadline,
a scaffold that stops without submitting, `TaskOutcome` raised by the scaffold) are a
failed result with `ERROR_KIND_TASK` and reward 0. A scaffold that crashes (a bug: an
exception that is not MegaFlow's) is a failed result with no reward
(`ERROR_KIND_INVALID`): retrying the same code will not help and a bug is not a
score. Failures of the platform (sandbox, model, unreachable services) propagate as
`InfrastructureError`, for the scheduler to retry: they are never scored.

Resume (`resume=` an earlier attempt's checkpoint) does not depend on the scaffold:
the scaffold runs again from its start while the session *replays* the checkpoint —
model turns are answered from the record, and environment actions are checked against
the recorded ones and re-applied to the fresh environment (plain reads are answered
from the record), each observation verified. When the record is used up the session
goes live. A scaffold that does something else than it did (a different prompt, a
different action) or an environment that answers differently makes the session start
the task over, in a fresh environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from megaflow.agent.checkpoint import (
    REPLAY,
    CheckpointWriter,
    Encoded,
    Mark,
    Record,
    ReplayMismatch,
    StaleAttemptError,
    check_resumable,
    conversation,
    record,
)
from megaflow.agent.replay import Replay
from megaflow.agent.scaffold import Scaffold, default_scaffold
from megaflow.contract import EnvironmentService, ModelService
from megaflow.contract.requests import environment_request
from megaflow.core.errors import MegaFlowError
from megaflow.core.runtime import coarse_timeout
from megaflow.v1 import agent_pb2, common_pb2, env_pb2, model_pb2

log = logging.getLogger(__name__)

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


class TaskOutcome(Exception):
    """Raised by a scaffold (or the session) to end the task with a task-caused failure:
    final, reward 0 (e.g. "gave up", "step limit reached")."""


class _StartOver(BaseException):
    """The replay diverged: run the scaffold again from nothing. A BaseException so that a
    scaffold's own `except Exception` cannot swallow it."""


class TaskSession:
    """Runs one task's scaffold to a result and a trajectory (see the module docstring)."""

    def __init__(
        self,
        task: common_pb2.TaskSpec,
        attempt_id: str,
        *,
        env: EnvironmentService,
        model: ModelService,
        limits: AgentLimits,
        scaffold: Callable[[], Scaffold] | None = None,
        checkpoints: CheckpointWriter | None = None,
        checkpoint_every: int = 1,
        resume: common_pb2.AgentCheckpoint | None = None,
    ) -> None:
        """`scaffold` makes the scaffold (called again when a resume starts over);
        default: the built-in tool agent."""
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
        self._make_scaffold = scaffold or default_scaffold
        # Built in place inside the response the Agent Service returns: no copy at the end.
        self.response = agent_pb2.RunTaskResponse()
        self.result = self.response.result
        self.result.task_id, self.result.attempt_id = task.task_id, attempt_id
        self.trajectory = self.response.trajectory
        self.trajectory.task_id, self.trajectory.attempt_id = task.task_id, attempt_id
        self.resume = resume
        self.env_id = ""
        self.workdir = ""
        self.host_socket_dir = ""  # see CreateEnvironmentResponse.host_socket_dir
        self.submitted = False
        self._writer = checkpoints if checkpoint_every > 0 else None
        self._every = checkpoint_every
        self._mark: Mark | None = None
        self._encoded = Encoded()
        self._elapsed0 = 0.0  # task time used by earlier attempts
        self._started = 0.0
        self._request = self._new_request()
        self._early: list[common_pb2.SessionAction] = []  # actions before the first turn
        self._replay: Replay | None = None
        self._task: asyncio.Task[object] | None = None
        self._looping = False
        self._stale = False

    def _new_request(self) -> model_pb2.GenerateRequest:
        # One request, grown turn by turn: the conversation is not copied on every call.
        return model_pb2.GenerateRequest(
            task_id=self.task.task_id, model=self.task.model, max_tokens=self.max_completion_tokens
        )

    # -- what a scaffold uses ------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Model turns taken so far (this attempt and the ones it resumed)."""
        return len(self.trajectory.turns)

    def set_tools(self, tools: Sequence[common_pb2.ToolSpec], tool_choice: str = "") -> None:
        """The tools offered to the model on every following turn, and OpenAI's
        `tool_choice` ("" / "auto", "none", "required" or a function's name)."""
        del self._request.tools[:]
        self._request.tools.extend(tools)
        self._request.tool_choice = tool_choice

    async def generate(self, messages: Sequence[common_pb2.ChatMessage]) -> common_pb2.ChatMessage:
        """One model turn: `messages` (what is new since the last turn) are added to the
        conversation, and the model's answer is returned (and recorded with its token
        ids, logprobs and version). Ends the task (TaskOutcome) past the step or token
        budget."""
        if self._replay is not None:
            recorded = self._replay.generate(messages)
            if recorded is not None:
                self._request.messages.extend(messages)
                self._request.messages.append(recorded)
                return recorded
            self._go_live()
        turns = self.trajectory.turns
        used = self.result.prompt_tokens + self.result.completion_tokens
        if used > self.max_tokens:
            self.trajectory.messages.extend(messages)
            raise TaskOutcome(f"token limit of {self.max_tokens} reached ({used} used)")
        n = len(turns)
        if n >= self.max_steps:
            self.trajectory.messages.extend(messages)
            raise TaskOutcome(f"step limit of {self.max_steps} reached without submitting")
        if self._writer is not None and n and n % self._every == 0:
            self._checkpoint()
        request = self._request
        self.trajectory.messages.extend(messages)
        request.messages.extend(messages)
        turn = turns.add(index=n, prompt_delta=messages)
        if self._early:
            turn.actions.extend(self._early)
            self._early.clear()
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
        self.trajectory.messages.append(response.message)
        request.messages.append(response.message)
        return turn.response

    def start_conversation(self) -> None:
        """The next `generate` starts a new conversation: the model sees only the messages
        it is given (for scaffolds that keep their own history and may rewrite it, e.g. a
        CLI agent that compacts its context or makes a side call). The trajectory keeps
        every message in the order it was sent."""
        del self._request.messages[:]

    def observe(self, message: common_pb2.ChatMessage) -> None:
        """Note a tool result (or any observation) the scaffold made of the current turn."""
        turns = self.trajectory.turns
        if turns and self._replay is None:  # a replayed turn has its observations
            turns[-1].observations.append(message)

    def record_messages(self, messages: Sequence[common_pb2.ChatMessage]) -> None:
        """Add messages to the trajectory's conversation that no model call will carry
        (e.g. the observation of the final `submit`)."""
        self.trajectory.messages.extend(messages)

    async def execute(self, command: str, timeout_s: float = 0.0) -> env_pb2.ExecuteStepResponse:
        """Run `command` in the environment's persistent shell (within the step budget)."""
        timeout_s = timeout_s or self.step_timeout_s
        if self._replay is not None:
            action = common_pb2.SessionAction(kind="execute", command=command, timeout_s=timeout_s)
            recorded = self._replay.next_action(action)
            if recorded is not None:  # a plain read: the record answers
                return env_pb2.ExecuteStepResponse(
                    output=recorded.observation,
                    exit_code=recorded.exit_code,
                    timed_out=recorded.timed_out,
                )
        t0 = time.monotonic()
        step = await self.env.execute_step(
            env_pb2.ExecuteStepRequest(env_id=self.env_id, command=command, timeout_s=timeout_s)
        )
        self._record(
            time.monotonic() - t0,
            kind="execute",
            command=command,
            timeout_s=timeout_s,
            observation=step.output,
            exit_code=step.exit_code,
            timed_out=step.timed_out,
        )
        return step

    async def edit(self, path: str, old: str, new: str) -> env_pb2.SubmitActionResponse:
        """Replace exactly one occurrence of `old` by `new` in a file; `ok` False (and a
        message for the model) when it cannot."""
        edit = env_pb2.EditFile(path=path, old=old, new=new)
        request = env_pb2.SubmitActionRequest(edit_file=edit)
        return await self._file_action(request, kind="edit", path=path, old=old, new=new)

    async def write(self, path: str, content: bytes) -> env_pb2.SubmitActionResponse:
        write = env_pb2.WriteFile(path=path, content=content)
        request = env_pb2.SubmitActionRequest(write_file=write)
        return await self._file_action(request, kind="write", path=path, content=content)

    async def read(self, path: str) -> env_pb2.SubmitActionResponse:
        request = env_pb2.SubmitActionRequest(read_file=env_pb2.ReadFile(path=path))
        return await self._file_action(request, kind="read", path=path)

    async def submit(self) -> env_pb2.SubmitActionResponse:
        """Done: the hidden evaluation runs and its reward is the task's result."""
        if self._replay is not None:
            self._go_live()
        reply = await self.env.submit_action(
            env_pb2.SubmitActionRequest(
                env_id=self.env_id, submit=env_pb2.Submit(scoring_timeout_s=self.scoring_timeout_s)
            )
        )
        self.submitted = True
        result = self.result
        result.state = common_pb2.TASK_STATE_SUCCEEDED
        result.has_reward = reply.has_reward
        result.reward = reply.reward
        result.eval_output = reply.eval_output
        result.tests.extend(reply.tests)
        return reply

    async def _file_action(
        self, request: env_pb2.SubmitActionRequest, **fields: Any
    ) -> env_pb2.SubmitActionResponse:
        """`fields`: the action as recorded (`SessionAction`), less what it returned."""
        if self._replay is not None:
            recorded = self._replay.next_action(common_pb2.SessionAction(**fields))
            if recorded is not None:
                return env_pb2.SubmitActionResponse(
                    ok=recorded.ok, message=recorded.observation, content=recorded.content
                )
        request.env_id = self.env_id
        t0 = time.monotonic()
        reply = await self.env.submit_action(request)
        if fields["kind"] == "read":
            fields["content"] = reply.content
        self._record(time.monotonic() - t0, ok=reply.ok, observation=reply.message, **fields)
        return reply

    def _record(self, elapsed_s: float, **fields: Any) -> None:
        """Record an action that ran (`fields`: its `SessionAction`), in place on the
        current turn; while replaying, check it against the record instead."""
        if self._replay is not None:
            self._replay.verify(common_pb2.SessionAction(**fields))  # _StartOver if it differs
            return
        turns = self.trajectory.turns
        if not turns:
            self._early.append(common_pb2.SessionAction(**fields))
            return
        turn = turns[-1]
        turn.actions.add(**fields)
        turn.env_latency_s += elapsed_s

    # -- checkpoints (see megaflow.agent.checkpoint) ---------------------------------------
    @property
    def task_id(self) -> str:
        return self.task.task_id

    def checkpoint_record(self, append: bool) -> Record:
        """The write that stores the latest marked state (see `checkpoint.record`)."""
        assert self._mark is not None
        return record(self.trajectory, self._mark, self._encoded, append=append)

    def on_stale(self) -> None:
        """The store refused our checkpoint: another attempt owns the task. Stop."""
        self._stale = True
        if self._looping and self._task is not None and not self._task.done():
            log.warning(
                "attempt %s is no longer current (checkpoint refused): stopping", self.attempt_id
            )
            self._task.cancel()

    def _checkpoint(self) -> None:
        assert self._writer is not None
        turns = self.trajectory.turns
        self._mark = Mark(
            turns=len(turns),
            pending=[],
            prompt_tokens=self.result.prompt_tokens,
            completion_tokens=self.result.completion_tokens,
            elapsed_s=self._elapsed0 + time.monotonic() - self._started,
            model_version=turns[-1].model_version,
        )
        self._writer.offer(self)

    async def _flush(self) -> None:
        if self._writer is None or self._stale or self._mark is None:
            return
        try:
            async with asyncio.timeout(self._writer.config.flush_timeout_s):
                await self._writer.flush(self)
        except TimeoutError:
            log.warning("checkpoint of %s not flushed in time", self.attempt_id)

    # -- the platform's part ------------------------------------------------------------
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

    async def _run(self) -> tuple[common_pb2.TaskResult, common_pb2.Trajectory]:
        started = time.monotonic()
        self.env_id = await self._create()
        if self.resume is not None:
            self._begin_replay(self.resume)
        self.result.setup_s = time.monotonic() - started
        try:
            while True:
                try:
                    await self._drive()
                    break
                except _StartOver:
                    await self._start_over()
        finally:
            self._looping = False
            if self._writer is not None:
                self._writer.discard(self)  # the result (or the error's flush) supersedes it
            released = time.monotonic()
            await self._release(self.env_id)
            self.result.teardown_s = time.monotonic() - released
        self.result.duration_s = time.monotonic() - started
        self.result.steps = len(self.trajectory.turns)
        return self.result, self.trajectory

    async def _drive(self) -> None:
        """Run the scaffold to its end inside the task's deadline; classify how it ended."""
        scaffold = self._make_scaffold()
        self._started = time.monotonic()
        try:
            self._looping = True
            # coarse: tens of thousands of far deadlines share a few timer handles
            async with coarse_timeout(max(self.task_timeout_s - self._elapsed0, 0.0)):
                await scaffold.run(self)
            if not self.submitted:
                raise TaskOutcome("the scaffold finished without submitting")
        except _StartOver:
            raise
        except (MegaFlowError, asyncio.CancelledError):
            # An infrastructure error (a DeadlineExceededError of the platform included) or
            # a cancellation: the next attempt resumes from the latest checkpoint, so make
            # it durable before reporting.
            self._looping = False
            await self._flush()
            raise
        except TimeoutError:
            self._fail(f"task deadline of {self.task_timeout_s:.0f}s passed")
        except TaskOutcome as outcome:
            self._fail(str(outcome))
        except Exception as error:  # the scaffold's own bug: final, and not a score
            log.exception("scaffold of %s failed", self.attempt_id)
            result = self.result
            result.state = common_pb2.TASK_STATE_FAILED
            result.error_kind = common_pb2.ERROR_KIND_INVALID
            result.error = f"the scaffold failed: {type(error).__name__}: {error}"
            result.has_reward = False
        finally:
            self._looping = False

    def _fail(self, message: str) -> None:
        self.result.state = common_pb2.TASK_STATE_FAILED
        self.result.error_kind = common_pb2.ERROR_KIND_TASK
        self.result.error = message
        self.result.has_reward = True
        self.result.reward = 0.0

    # -- resume --------------------------------------------------------------------------
    def _begin_replay(self, checkpoint: common_pb2.AgentCheckpoint) -> None:
        try:
            check_resumable(checkpoint, self.task.task_id, self.max_steps)
        except ReplayMismatch as mismatch:
            self._cannot_resume(checkpoint.attempt_id, mismatch)
            return
        trajectory = self.trajectory
        trajectory.CopyFrom(checkpoint.trajectory)
        trajectory.attempt_id = self.attempt_id
        if not trajectory.messages:  # checkpoints leave it out: the turns hold it
            trajectory.messages.extend(conversation(trajectory.turns))
        self.result.prompt_tokens = checkpoint.prompt_tokens
        self.result.completion_tokens = checkpoint.completion_tokens
        self._elapsed0 = checkpoint.elapsed_s
        self._replay = Replay(checkpoint, on_diverge=self._diverged)

    def _diverged(self, why: str) -> BaseException:
        assert self._replay is not None
        self._cannot_resume(self._replay.checkpoint.attempt_id, why)
        return _StartOver(why)

    def _cannot_resume(self, from_attempt: str, why: object) -> None:
        log.warning(
            "attempt %s cannot resume from %s's checkpoint (%s): starting over",
            self.attempt_id,
            from_attempt,
            why,
        )

    def _go_live(self) -> None:
        """The record is used up: from here on the scaffold acts for real."""
        replay = self._replay
        assert replay is not None
        replay.finish()  # _StartOver if recorded actions were left undone
        self._replay = None
        self.trajectory.resumptions.add(
            at_turn=len(self.trajectory.turns),
            from_attempt_id=replay.checkpoint.attempt_id,
            attempt_id=self.attempt_id,
            method=REPLAY,
            replayed_actions=replay.replayed,
            restore_s=time.monotonic() - self._started,
        )
        log.info(
            "attempt %s resumed %s at turn %d (%d actions replayed)",
            self.attempt_id,
            replay.checkpoint.attempt_id,
            len(self.trajectory.turns),
            replay.replayed,
        )

    async def _start_over(self) -> None:
        """Forget the replayed state and the environment it was applied to; begin anew."""
        self._replay = None
        self._mark = None
        self._encoded = Encoded()
        self._elapsed0 = 0.0
        self._request = self._new_request()
        self._early.clear()
        self.trajectory.Clear()
        self.trajectory.task_id, self.trajectory.attempt_id = self.task.task_id, self.attempt_id
        self.result.prompt_tokens = self.result.completion_tokens = 0
        old, self.env_id = self.env_id, ""
        await self._release(old)
        self.env_id = await self._create()

    # -- the environment's lifecycle ----------------------------------------------------
    async def _create(self) -> str:
        request = environment_request(
            self.task,
            owner=self.attempt_id,
            setup_timeout_s=self.setup_timeout_s,
            lease_s=self.task_timeout_s + self.scoring_timeout_s + 60.0,
        )
        try:
            created = await self.env.create_environment(request)
        except BaseException:
            # Cancelled or failed in flight: the service may have made the environment
            # all the same (the answer lost), and this attempt never learns its id.
            await _to_the_end(self._release_owned())
            raise
        self.workdir = created.workdir
        self.host_socket_dir = created.host_socket_dir
        return created.env_id

    async def _release(self, env_id: str) -> None:
        """Release an environment; the call completes even if this attempt is cancelled
        meanwhile (its caller gone as it finished): a release cut off in flight would
        leave the sandbox to the lease reaper."""
        if env_id:
            await _to_the_end(self._release_quietly(env_id))

    async def _release_quietly(self, env_id: str) -> None:
        with contextlib.suppress(MegaFlowError, OSError, asyncio.TimeoutError):
            await self.env.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))

    async def _release_owned(self) -> None:
        """Release whatever the Environment Service holds for this attempt (best effort:
        the lease reaper is the backstop)."""
        with contextlib.suppress(MegaFlowError, OSError, asyncio.TimeoutError):
            async with asyncio.timeout(RELEASE_OWNED_TIMEOUT_S):
                request = env_pb2.ReleaseEnvironmentRequest(owner=self.attempt_id)
                await self.env.release_environment(request)


async def _to_the_end(cleanup: Coroutine[Any, Any, None]) -> None:
    """Await a cleanup call to its end (it has its own timeout) even if the caller is
    cancelled meanwhile; the cancellation is raised after it."""
    call = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait([call])  # not cancelled by a further cancel of ours
        raise
