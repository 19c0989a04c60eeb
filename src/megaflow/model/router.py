"""The replica router: a pure policy, state in, choice out.

`Router.choose(replicas, ...)` looks only at the `ReplicaView`s it is given (no I/O, no
clock) and returns a `Route`: the chosen replica id, or why there is none. The Model
Service (`megaflow.model.service`) builds the views from its live replicas, dispatches,
and retries elsewhere on failure.

Eligibility, in order of preference:

    1. healthy, accepting (not draining), not excluded, not saturated (in_flight < capacity)
    2. if no replica is healthy at all: unhealthy-but-accepting ones (health may be stale;
       trying beats failing) — never while any healthy replica exists
    3. none: `Route(None, "saturated")` when healthy ones exist but are all full (the
       caller waits), else `Route(None, "unavailable")`

Policies among the eligible:

    least_loaded   fewest in-flight requests per unit of capacity (free batch slots
                   keep a GPU busy), then fewest in-flight tokens (this request's
                   included) per unit of capacity, then the shallowest backend queue;
                   exact ties rotate (default)
    round_robin    the next eligible replica in id order after the last choice
    p2c            power of two choices: two random eligible replicas (seeded), the less
                   loaded wins

Stickiness (`sticky=True`, on by default): a task's turns go to the replica that served
its previous turn while that replica is eligible (healthy, accepting, below capacity)
and not overloaded: its in-flight count + 1 is at most `sticky_max_load_ratio` times
the least busy eligible replica's + 1. So the task's prefix cache is reused there.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class RoutePolicy(StrEnum):
    """How a replica is picked among the eligible ones."""

    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    P2C = "p2c"


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows about one replica at decision time."""

    id: str
    healthy: bool = True
    accepting: bool = True  # False while draining or retired
    in_flight: int = 0
    in_flight_tokens: int = 0
    queued: int = 0  # requests waiting inside the backend (e.g. for a batch slot)
    capacity: int = 1  # most concurrent requests the service sends it


@dataclass(frozen=True)
class Route:
    """The decision: a replica id, or None with a reason ("saturated" | "unavailable")."""

    replica: str | None
    reason: str = "ok"
    sticky: bool = False


def load(view: ReplicaView, tokens: int = 0) -> tuple[float, float, int]:
    """The least-loaded order: in-flight requests, then in-flight tokens (plus this
    request's), both per unit of capacity, then the backend's queue depth."""
    capacity = max(view.capacity, 1)
    return (view.in_flight / capacity, (view.in_flight_tokens + tokens) / capacity, view.queued)


class Router:
    """A routing policy with its own small state (round-robin cursor, sticky map, RNG)."""

    def __init__(
        self,
        policy: RoutePolicy | str = RoutePolicy.LEAST_LOADED,
        *,
        sticky: bool = True,
        seed: int = 0,
        max_sticky_tasks: int = 100_000,
        sticky_max_load_ratio: float = 2.0,
    ) -> None:
        self.policy = RoutePolicy(policy)
        self.sticky = sticky
        self.max_sticky_tasks = max_sticky_tasks
        self.sticky_max_load_ratio = sticky_max_load_ratio
        self._rng = random.Random(seed)
        self._cursor = 0
        self._affinity: OrderedDict[str, str] = OrderedDict()  # task id -> replica id

    def affinity(self, task_id: str) -> str | None:
        """The replica a task is stuck to, if any."""
        return self._affinity.get(task_id)

    def forget(self, task_id: str) -> None:
        self._affinity.pop(task_id, None)

    def choose(
        self,
        replicas: Sequence[ReplicaView],
        *,
        task_id: str = "",
        tokens: int = 0,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> Route:
        """Pick a replica for one request; see the module docstring."""
        open_ = [r for r in replicas if r.accepting and r.id not in exclude]
        healthy = [r for r in open_ if r.healthy]
        pool = healthy or open_
        if not pool:
            return Route(None, "unavailable")
        eligible = [r for r in pool if r.in_flight < r.capacity]
        if not eligible:
            return Route(None, "saturated")
        if self.sticky and task_id:
            stuck = self._sticky_choice(task_id, eligible)
            if stuck is not None:
                return Route(stuck, sticky=True)
        chosen = self._pick(eligible, tokens)
        if self.sticky and task_id:
            self._affinity[task_id] = chosen
            self._affinity.move_to_end(task_id)
            while len(self._affinity) > self.max_sticky_tasks:
                self._affinity.popitem(last=False)
        return Route(chosen)

    def only(self, replica_id: str, task_id: str = "") -> None:
        """What `choose` does when `replica_id` is the one open replica below its
        capacity (the caller checked): the task is (still) stuck to it. No `Route`."""
        if self.sticky and task_id:
            affinity = self._affinity
            affinity[task_id] = replica_id
            affinity.move_to_end(task_id)
            while len(affinity) > self.max_sticky_tasks:
                affinity.popitem(last=False)

    def _sticky_choice(self, task_id: str, eligible: list[ReplicaView]) -> str | None:
        target = self._affinity.get(task_id)
        if target is None:
            return None
        view = next((r for r in eligible if r.id == target), None)
        if view is None:
            return None
        lightest = min(r.in_flight for r in eligible)
        if view.in_flight + 1 > (lightest + 1) * self.sticky_max_load_ratio:
            return None  # overloaded relative to the others: move the task
        self._affinity.move_to_end(task_id)
        return target

    def _pick(self, eligible: list[ReplicaView], tokens: int) -> str:
        if len(eligible) == 1:
            return eligible[0].id
        if self.policy is RoutePolicy.ROUND_ROBIN:
            ordered = sorted(eligible, key=lambda r: r.id)
            chosen = ordered[self._cursor % len(ordered)]
            self._cursor += 1
            return chosen.id
        if self.policy is RoutePolicy.P2C:
            a, b = self._rng.sample(eligible, 2)
            return min((a, b), key=lambda r: load(r, tokens)).id
        n = len(eligible)
        start = self._cursor % n
        self._cursor += 1
        rotated = eligible[start:] + eligible[:start]  # ties go round
        return min(rotated, key=lambda r: load(r, tokens)).id
