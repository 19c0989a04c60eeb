"""The multi-process deployment: one service per process, over gRPC.

`serve(kind, ...)` hosts one service, prints a `ready` line with its address, and —
for model, agent and env services — registers with the scheduler and re-registers
every heartbeat interval so the scheduler knows it is alive. The heartbeat outlives the
scheduler: while it is down (or restarting) each call times out within an interval and
is retried with bounded backoff on a fresh channel, so the service re-registers as soon
as a scheduler answers at that address again. SIGTERM or SIGINT stops it gracefully:
the server drains, then the service releases what it holds. A scheduler that refuses
the service's credentials (`AuthenticationError`) stops it with exit status 2 and the
reason, instead of a retry loop; so does a listen address refused for lack of them
(`megaflow.rpc.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from megaflow.core import jitter
from megaflow.core.errors import AuthenticationError, MegaFlowError
from megaflow.core.runtime import GcTuner
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


RETRY_MIN_S = 0.25  # first retry after a failed heartbeat; doubles up to the interval


async def _register_forever(
    scheduler: str,
    kind: str,
    address: str,
    capacity: int,
    registered: asyncio.Event,
    resources: Callable[[], scheduler_pb2.HostResources] | None = None,
    interval: float = 2.0,
) -> None:
    """Register every `interval` (the scheduler's reply sets it), at a fixed rate.

    A failed call (scheduler down, restarting, overloaded) is retried after a backoff
    from `RETRY_MIN_S` doubling up to one interval, on a new channel (a channel that
    failed for a while would otherwise wait out gRPC's reconnect backoff); each call
    times out within one interval (at most 5 s), so the loop can never hang."""
    client = SchedulerServiceClient(scheduler, timeout_s=5.0)
    backoff = jitter.Backoff(RETRY_MIN_S, interval, floor=RETRY_MIN_S / 5)
    failing = False
    try:
        while True:
            started = time.monotonic()
            try:
                reply = await client.register_service(
                    scheduler_pb2.RegisterServiceRequest(
                        kind=KINDS[kind],
                        address=address,
                        capacity=capacity,
                        resources=resources() if resources is not None else None,
                    ),
                    timeout_s=min(interval, 5.0),
                )
            except AuthenticationError:
                raise  # wrong credentials: retrying cannot help; the service stops
            except Exception as error:  # the heartbeat must outlive anything
                if not failing:
                    log.warning("cannot register with scheduler %s: %s", scheduler, error)
                failing = True
                await client.close()
                client = SchedulerServiceClient(scheduler, timeout_s=5.0)
                backoff.cap = interval
                await asyncio.sleep(backoff.next())  # jittered: no restart stampede
                continue
            interval = reply.heartbeat_interval_s or interval
            backoff.reset()
            if failing or not registered.is_set():
                log.info("%s at %s registered with scheduler %s", kind, address, scheduler)
                failing = False
                registered.set()
            await asyncio.sleep(
                jitter.spread(max(0.0, interval - (time.monotonic() - started)), 0.1)
            )
    finally:
        await client.close()


def _advertised(advertise: str, port: int) -> str:
    """`HOST[:PORT]` as the address others reach this service at: without a port (or
    with port 0) the port it listens on."""
    host, sep, given = advertise.rpartition(":")
    if not sep or not given.isdigit() or host.endswith(":") or advertise.endswith("]"):
        host, given = advertise, "0"  # no port (a bare IPv6 address in brackets too)
    return f"{host}:{port if int(given) == 0 else given}"


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
    server = GrpcServer(listen, {kind: impl})
    try:
        server.security.check_bind(listen)  # before the service starts anything
    except MegaFlowError as error:
        print(f"megaflow {kind}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        await impl.start()
    except MegaFlowError as error:
        print(f"megaflow {kind}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    registrar: asyncio.Task[None] | None = None
    collector = GcTuner()  # thousands of loops per process: no full-heap GC pauses
    failure: str | None = None
    try:
        await server.start()
    except MegaFlowError as error:
        await impl.stop()
        print(f"megaflow {kind}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        collector.start()
        address = _advertised(advertise, server.port) if advertise else server.address
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
            registrar.add_done_callback(lambda _: stop.set())
        await stop.wait()
        if registrar is not None and registrar.done() and not registrar.cancelled():
            refused = registrar.exception()
            if isinstance(refused, AuthenticationError):
                failure = f"cannot register with scheduler {scheduler}: {refused}"
    finally:
        if registrar is not None:
            registrar.cancel()
            with contextlib.suppress(asyncio.CancelledError, AuthenticationError):
                await registrar
        await collector.stop()
        await server.stop(grace_s=2.0)
        await impl.stop()
    if failure is not None:
        print(f"megaflow {kind}: error: {failure}", file=sys.stderr, flush=True)
        raise SystemExit(2)
