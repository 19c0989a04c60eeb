"""Registered services, their resource accounting, and level-1 placement.

Level 1 of the two-level bin packing: an attempt's environment goes to the env host
that can hold it (capacity and advertised resources, never over-committed) with the
best image locality — the image's warm pool still has room (2) > the image is cached
or has a warm pool (1) > neither (0) — then the least loaded one (GPU tasks: the one
left with the fewest free GPUs, so whole GPU hosts stay free for larger tasks). The
agent loop goes to an agent service on the same node as that env host when one has
room, else to the least-loaded agent service. Level 2 (which model replica serves each
request) is the Model Service's router; here a model service is only the least loaded.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from megaflow.scheduler.resources import Need, Offer, node_of
from megaflow.v1 import scheduler_pb2

ServiceKind: TypeAlias = scheduler_pb2.ServiceKind.ValueType
KIND_MODEL = scheduler_pb2.SERVICE_KIND_MODEL
KIND_AGENT = scheduler_pb2.SERVICE_KIND_AGENT
KIND_ENV = scheduler_pb2.SERVICE_KIND_ENV

WARM, CACHED, COLD = 2, 1, 0


@dataclass(eq=False)
class Service:
    kind: ServiceKind
    address: str
    capacity: int
    offer: Offer = field(default_factory=Offer)
    in_flight: int = 0
    dispatched: int = 0
    cpu_millis_used: int = 0
    memory_mib_used: int = 0
    gpus_used: int = 0
    warm_placements: int = 0
    image_in_flight: dict[str, int] = field(default_factory=dict)
    node: str = ""  # the machine it runs on (see `resources.node_of`)
    heartbeats: bool = False  # registered over the network (see `ServiceJoined.heartbeats`)

    def __post_init__(self) -> None:
        self.node = node_of(self.address, self.offer)

    def update(self, capacity: int, offer: Offer | None) -> None:
        """A re-registration: new capacity and, when advertised, new resources."""
        self.capacity = capacity
        if offer is not None:
            self.offer = offer
            self.node = node_of(self.address, offer)

    @property
    def load(self) -> float:
        o = self.offer
        load = self.in_flight / max(self.capacity, 1)
        if o.cpu_millis:
            load = max(load, self.cpu_millis_used / o.cpu_millis)
        if o.memory_mib:
            load = max(load, self.memory_mib_used / o.memory_mib)
        if o.gpus:
            load = max(load, self.gpus_used / o.gpus)
        return load

    def fits(self, need: Need) -> bool:
        """Whether `need` fits in what is free now (capacity included)."""
        o = self.offer
        return (
            self.in_flight < self.capacity
            and (not o.cpu_millis or self.cpu_millis_used + need.cpu_millis <= o.cpu_millis)
            and (not o.memory_mib or self.memory_mib_used + need.memory_mib <= o.memory_mib)
            and self.gpus_used + need.gpus <= o.gpus
            and (not need.accelerator or need.accelerator == o.accelerator)
            and all(o.labels.get(k) == v for k, v in need.labels)
        )

    def locality(self, image: str) -> int:
        warm = self.offer.warm_images.get(image)
        if warm is not None:
            return WARM if self.image_in_flight.get(image, 0) < warm else CACHED
        return CACHED if image in self.offer.cached_images else COLD

    def hold_unit(self) -> None:
        """One unit of capacity (an agent loop, a model client), no resources."""
        self.in_flight += 1
        self.dispatched += 1

    def release_unit(self) -> None:
        self.in_flight -= 1

    def hold(self, need: Need, image: str) -> None:
        if self.locality(image) == WARM:
            self.warm_placements += 1
        self.in_flight += 1
        self.dispatched += 1
        self.cpu_millis_used += need.cpu_millis
        self.memory_mib_used += need.memory_mib
        self.gpus_used += need.gpus
        self.image_in_flight[image] = self.image_in_flight.get(image, 0) + 1

    def release(self, need: Need, image: str) -> None:
        self.in_flight -= 1
        self.cpu_millis_used -= need.cpu_millis
        self.memory_mib_used -= need.memory_mib
        self.gpus_used -= need.gpus
        left = self.image_in_flight.get(image, 0) - 1
        if left > 0:
            self.image_in_flight[image] = left
        else:
            self.image_in_flight.pop(image, None)


def pick_env(
    envs: Iterable[Service], need: Need, image: str, strategy: str, rng: random.Random
) -> Service | None:
    if strategy == "random":
        fitting = [env for env in envs if env.fits(need)]
        return rng.choice(fitting) if fitting else None
    best: Service | None = None
    best_key: tuple[float, ...] = ()
    for env in envs:
        if not env.fits(need):
            continue
        if strategy == "packing":
            spare_gpus = env.offer.gpus - env.gpus_used - need.gpus if need.gpus else 0
            key: tuple[float, ...] = (-env.locality(image), spare_gpus, env.load)
        else:
            key = (env.load,)
        if best is None or key < best_key:
            best, best_key = env, key
    return best


def pick_agent(agents: Iterable[Service], node: str | None) -> Service | None:
    """The least-loaded agent service with room, preferring those on `node`."""
    best: Service | None = None
    best_key: tuple[bool, float] = (True, 0.0)
    for agent in agents:
        if agent.in_flight >= agent.capacity:
            continue
        key = (node is None or agent.node != node, agent.load)
        if best is None or key < best_key:
            best, best_key = agent, key
    return best


def pick_model(models: Iterable[Service]) -> Service | None:
    """The least-loaded model service; its capacity is a soft limit (its router queues)."""
    best: Service | None = None
    for model in models:
        if best is None or model.load < best.load:
            best = model
    return best
