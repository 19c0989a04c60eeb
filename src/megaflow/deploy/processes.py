"""The multi-process deployment: one service per process, over gRPC.

`serve(kind, ...)` hosts one service, prints a `ready` line with its address, and —
for model, agent and env services — registers with the scheduler and re-registers
every heartbeat interval so the scheduler knows it is alive. SIGTERM or SIGINT stops
it gracefully: the server drains, then the service releases what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from megaflow.core.errors import MegaFlowError
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.scheduler.resources import local_offer
from megaflow.scheduler.state import KIND_AGENT, KIND_ENV, KIND_MODEL
from megaflow.v1 import scheduler_pb2

log = logging.getLogger(__name__)

KINDS = {"model": KIND_MODEL, "agent": KIND_AGENT, "env": KIND_ENV}


def advertised_resources(impl: Any) -> scheduler_pb2.HostResources:
    """What a service registers (at every heartbeat) as its host's resources: this
    machine's CPU and memory, an Environment Service's warm pools (image -> size), and
    whatever the service's own `advertised()` adds (e.g. the images it has cached)."""
    config = getattr(impl, "config", None)
    warm = getattr(config, "warm_pool", None)
    offer = local_offer(warm_images=dict(warm) if isinstance(warm, dict) else None)
    own = getattr(impl, "advertised", None)
    if callable(own):
        offer.MergeFrom(own())
    return offer


async def _register_forever(
    scheduler: str,
    kind: str,
    address: str,
    capacity: int,
    registered: asyncio.Event,
    resources: Callable[[], scheduler_pb2.HostResources] | None = None,
) -> None:
    client = SchedulerServiceClient(scheduler, timeout_s=5.0)
    interval = 2.0
    try:
        while True:
            try:
                reply = await client.register_service(
                    scheduler_pb2.RegisterServiceRequest(
                        kind=KINDS[kind],
                        address=address,
                        capacity=capacity,
                        resources=resources() if resources is not None else None,
                    )
                )
                interval = reply.heartbeat_interval_s or interval
                if not registered.is_set():
                    log.info("%s at %s registered with scheduler %s", kind, address, scheduler)
                    registered.set()
            except MegaFlowError as error:
                log.warning("cannot register with scheduler %s: %s", scheduler, error)
                interval = 1.0
            await asyncio.sleep(interval)
    finally:
        await client.close()


async def serve(
    kind: str,
    impl: Any,
    *,
    listen: str,
    scheduler: str | None = None,
    capacity: int = 0,
    advertise: str | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve `impl` as the `kind` service until `stop` is set or a signal arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await impl.start()
    server = GrpcServer(listen, {kind: impl})
    registrar: asyncio.Task[None] | None = None
    try:
        await server.start()
        address = advertise or server.address
        print(f"megaflow {kind} ready on {address}", file=sys.stdout, flush=True)
        if scheduler and kind in KINDS:
            registered = asyncio.Event()
            registrar = asyncio.create_task(
                _register_forever(
                    scheduler,
                    kind,
                    address,
                    capacity,
                    registered,
                    lambda: advertised_resources(impl),
                )
            )
        await stop.wait()
    finally:
        if registrar is not None:
            registrar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registrar
        await server.stop(grace_s=2.0)
        await impl.stop()
