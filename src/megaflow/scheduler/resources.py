"""Heterogeneous resources: what a task needs, what a host offers, and whether it fits.

A task's `ResourceRequirements` become a hashable `Need`; a registered service's
`HostResources` become an `Offer`. An environment host holds each running attempt's
need (and one unit of its capacity) from dispatch until the attempt ends.

Semantics of zero: a host advertising 0 CPU or 0 memory does not account that
resource (only its capacity, the number of concurrent environments, limits it), so
hosts that advertise nothing behave as before; GPUs and the accelerator kind must be
advertised to be offered. A task with no requirements needs one unit of capacity.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from megaflow.v1 import common_pb2, scheduler_pb2

NODE_LABEL = "node"


@dataclass(frozen=True)
class Need:
    cpu_millis: int = 0
    memory_mib: int = 0
    gpus: int = 0
    accelerator: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, spec: common_pb2.TaskSpec) -> Need:
        if not spec.HasField("resources"):
            return NO_NEED
        r = spec.resources
        return cls(
            r.cpu_millis, r.memory_mib, r.gpus, r.accelerator, tuple(sorted(r.labels.items()))
        )


NO_NEED = Need()


@dataclass(frozen=True)
class Offer:
    cpu_millis: int = 0
    memory_mib: int = 0
    gpus: int = 0
    accelerator: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    warm_images: dict[str, int] = field(default_factory=dict)
    cached_images: frozenset[str] = frozenset()

    @classmethod
    def of(cls, msg: scheduler_pb2.HostResources | None) -> Offer:
        if msg is None:
            return cls()
        return cls(
            msg.cpu_millis,
            msg.memory_mib,
            msg.gpus,
            msg.accelerator,
            dict(msg.labels),
            dict(msg.warm_images),
            frozenset(msg.cached_images),
        )

    def to_proto(self) -> scheduler_pb2.HostResources:
        return scheduler_pb2.HostResources(
            cpu_millis=self.cpu_millis,
            memory_mib=self.memory_mib,
            gpus=self.gpus,
            accelerator=self.accelerator,
            labels=self.labels,
            warm_images=self.warm_images,
            cached_images=sorted(self.cached_images),
        )


def unmet(need: Need, offer: Offer) -> str | None:
    """Why a host offering `offer` can never hold `need` (even when idle), or None."""
    if offer.cpu_millis and need.cpu_millis > offer.cpu_millis:
        return f"cpu_millis={need.cpu_millis} (host has {offer.cpu_millis})"
    if offer.memory_mib and need.memory_mib > offer.memory_mib:
        return f"memory_mib={need.memory_mib} (host has {offer.memory_mib})"
    if need.gpus > offer.gpus:
        return f"gpus={need.gpus} (host has {offer.gpus})"
    if need.accelerator and need.accelerator != offer.accelerator:
        return f"accelerator={need.accelerator!r} (host has {offer.accelerator or 'none'!r})"
    for key, value in need.labels:
        if offer.labels.get(key) != value:
            return f"label {key}={value!r} (host has {offer.labels.get(key)!r})"
    return None


def node_of(address: str, offer: Offer) -> str:
    """The machine a service runs on: its `node` label, else its address's host part."""
    return offer.labels.get(NODE_LABEL) or address.rpartition(":")[0]


@functools.cache
def _machine() -> tuple[int, int]:
    """This machine's CPU (millicores) and memory (MiB; 0 when unknown), read once."""
    memory_mib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_mib = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    return (os.cpu_count() or 1) * 1000, memory_mib


def local_offer(
    *, warm_images: dict[str, int] | None = None, labels: dict[str, str] | None = None
) -> scheduler_pb2.HostResources:
    """What this machine offers (CPU and memory), for a service to advertise."""
    cpu_millis, memory_mib = _machine()
    return scheduler_pb2.HostResources(
        cpu_millis=cpu_millis,
        memory_mib=memory_mib,
        labels=labels or {},
        warm_images=warm_images or {},
    )
