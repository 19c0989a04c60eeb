"""The admission queue: per-class heaps under one heap of classes, with blocked classes
parked by what blocks them.

A *class* groups the queued tasks that admission control cannot tell apart: same run,
user, resource pool, model, requirements and image. Within a class tasks are ordered by
(higher priority, earlier deadline, submission order); the ready classes sit in one heap
keyed by their best task. The scheduler pops the best class, and either dispatches its
head (`take_and_keep`) or parks the whole class under the blocker that stopped it (its
run's cap, its user's quota, its pool, its model's limits, no host that fits). A parked class is not
looked at again until that blocker is released, so a user at its quota never holds up
another user's tasks (no head-of-line blocking) and the work per dispatch is
O(log classes), independent of how many tasks are queued.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field

OrderKey = tuple[int, float, int]  # (-priority, absolute deadline or inf, submission seq)


@dataclass(eq=False)
class TaskClass:
    key: Hashable
    heap: list[tuple[OrderKey, str]] = field(default_factory=list)
    version: int = 0
    ready: bool = False
    blocked_on: Hashable | None = None

    def head(self) -> tuple[OrderKey, str]:
        return self.heap[0]


class AdmissionQueue:
    def __init__(self) -> None:
        self._classes: dict[Hashable, TaskClass] = {}
        self._ready: list[tuple[OrderKey, int, TaskClass]] = []
        self._blocked: dict[Hashable, dict[Hashable, TaskClass]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def blocked(self) -> bool:
        """Whether any class is parked."""
        return bool(self._blocked)

    @property
    def classes(self) -> int:
        return len(self._classes)

    def blocked_classes(self, blocker: Hashable) -> int:
        return len(self._blocked.get(blocker, ()))

    def push(self, class_key: Hashable, order: OrderKey, task_id: str) -> None:
        cls = self._classes.get(class_key)
        if cls is None:
            cls = self._classes[class_key] = TaskClass(class_key)
        better = not cls.heap or order < cls.heap[0][0]
        heapq.heappush(cls.heap, (order, task_id))
        self._size += 1
        if cls.blocked_on is None and (not cls.ready or better):
            self._make_ready(cls)

    def _make_ready(self, cls: TaskClass) -> None:
        cls.version += 1
        cls.ready = True
        heapq.heappush(self._ready, (cls.heap[0][0], cls.version, cls))

    def pop_ready(self) -> TaskClass | None:
        """The ready class with the best head task, checked out:
        `take_and_keep` or `block` it next."""
        while self._ready:
            _, version, cls = heapq.heappop(self._ready)
            if cls.ready and version == cls.version:
                cls.ready = False
                return cls
        return None

    def take_and_keep(self, cls: TaskClass) -> bool:
        """Remove the checked-out class's head task. The class stays checked out (True)
        while its next task is still the best ready one, which saves a heap round trip
        per dispatch; otherwise it goes back to the ready heap (False)."""
        heapq.heappop(cls.heap)
        self._size -= 1
        if not cls.heap:
            del self._classes[cls.key]
            return False
        ready = self._ready
        if not ready or cls.heap[0][0] < ready[0][0]:
            return True
        self._make_ready(cls)
        return False

    def block(self, cls: TaskClass, blocker: Hashable) -> None:
        """Park the checked-out class until `unblock(blocker)`."""
        cls.blocked_on = blocker
        self._blocked.setdefault(blocker, {})[cls.key] = cls

    def unblock(self, blocker: Hashable) -> None:
        if not self._blocked:
            return
        parked = self._blocked.pop(blocker, None)
        if parked is None:
            return
        for cls in parked.values():
            cls.blocked_on = None
            self._make_ready(cls)
