"""Replaying a checkpoint while a scaffold runs again from its start (see
`megaflow.agent.session`).

The record is the checkpoint's turns: each model answer, and each environment action
(`SessionAction`) with what it returned. While replaying, a model turn is answered
from the record when the scaffold sends exactly the recorded prompt; an action must be
the next recorded one: a plain read (`read`, or a command `is_pure_read` accepts) is
answered from the record, anything else is re-applied to the fresh environment and
what it returns must equal the record. Any difference is a divergence: the session
starts the task over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megaflow.agent.checkpoint import is_pure_read
from megaflow.v1 import common_pb2

_REQUEST_FIELDS = ("kind", "command", "timeout_s", "path", "old", "new")


def _request_of(action: common_pb2.SessionAction) -> tuple[object, ...]:
    fields = tuple(getattr(action, f) for f in _REQUEST_FIELDS)
    return (*fields, action.content if action.kind == "write" else b"")


def _answer_of(action: common_pb2.SessionAction) -> tuple[object, ...]:
    return (action.observation, action.exit_code, action.timed_out, action.ok, action.content)


def answered_from_record(action: common_pb2.SessionAction) -> bool:
    """Whether replay can answer `action` from the record (it cannot change anything)."""
    return action.kind == "read" or (action.kind == "execute" and is_pure_read(action.command))


class Replay:
    """The position of a replay in its checkpoint."""

    def __init__(
        self,
        checkpoint: common_pb2.AgentCheckpoint,
        on_diverge: Callable[[str], BaseException],
    ) -> None:
        """`on_diverge(why)` returns the exception to raise when the run departs from the
        record."""
        self.checkpoint = checkpoint
        self.turns = checkpoint.trajectory.turns
        self.actions = [action for turn in self.turns for action in turn.actions]
        self.replayed = 0  # actions re-applied to the environment
        self._turn = 0
        self._next = 0
        self._applying: common_pb2.SessionAction | None = None
        self._on_diverge = on_diverge

    def generate(self, messages: Sequence[common_pb2.ChatMessage]) -> common_pb2.ChatMessage | None:
        """The recorded answer to this model turn, or None when the record has no more
        turns (the session goes live)."""
        if self._turn >= len(self.turns):
            return None
        turn = self.turns[self._turn]
        if list(messages) != list(turn.prompt_delta):
            raise self._on_diverge(f"turn {turn.index}: the prompt differs from the recorded one")
        self._turn += 1
        return turn.response

    def next_action(self, action: common_pb2.SessionAction) -> common_pb2.SessionAction | None:
        """`action` must be the next recorded one. Returns the record when it answers the
        action; None when the action must be re-applied (then call `verify`)."""
        if self._next >= len(self.actions):
            raise self._on_diverge(f"an {action.kind} the record does not have")
        recorded = self.actions[self._next]
        if _request_of(recorded) != _request_of(action):
            raise self._on_diverge(
                f"action {self._next + 1}: {action.kind} differs from the recorded {recorded.kind}"
            )
        self._next += 1
        if answered_from_record(recorded):
            return recorded
        self._applying = recorded
        return None

    def verify(self, action: common_pb2.SessionAction) -> None:
        """What a re-applied action returned must equal the record."""
        recorded, self._applying = self._applying, None
        assert recorded is not None, "verify() without next_action()"
        if _answer_of(recorded) != _answer_of(action):
            raise self._on_diverge(
                f"action {self._next} {action.kind}: the observation differs from the recorded "
                f"one ({len(action.observation)} vs {len(recorded.observation)} characters)"
            )
        self.replayed += 1

    def finish(self) -> None:
        """The record is used up; diverged if the run left recorded actions undone."""
        if self._next < len(self.actions):
            raise self._on_diverge(
                f"{len(self.actions) - self._next} recorded actions were not taken again"
            )
