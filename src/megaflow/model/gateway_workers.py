"""More processes serving one gateway address: `megaflow serve model --gateway-workers N`.

The first gateway runs in the service's own process; `GatewayWorkers` starts `N - 1`
more (multiprocessing, *spawn*), each a `Gateway` on the same host:port with
`SO_REUSEPORT`, so the kernel spreads incoming connections over the processes and no
process is a single-core bottleneck.

Each worker builds its **own** Model Service from `build_service` (a picklable
callable, e.g. a `functools.partial` over the CLI's settings): the gateway's hot path
stays in-process, with no extra hop. What that means, honestly:

- an OpenAI-compatible upstream (`openai:URL`) is shared state anyway: every worker
  sends to it, each with its own connection pool and its own view of replica health;
- a simulated model gets one simulated GPU per worker;
- a hot swap (`UpdateWeights` over gRPC) reaches the service of the first process only;
  the workers keep serving the version they started with;
- trajectories are recorded by the worker that served a call. The kernel places
  *connections*, not tasks: a task whose client opens several connections may have its
  turns split over workers, and `GET /v1/megaflow/trajectories/{task}` answers from
  whichever worker took that connection. Use one worker (the default) where the gateway's
  per-task recording must be whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from megaflow.core.errors import InfrastructureError
from megaflow.model.gateway import Gateway, GatewayConfig

__all__ = ["GatewayWorkers"]

log = logging.getLogger(__name__)

ServiceBuilder = Callable[[], Any]  # -> a ModelService with async start()/stop()
PARENT_CHECK_S = 0.5  # how often a worker checks that the process that started it lives


async def _serve(
    build_service: ServiceBuilder, host: str, port: int, config: GatewayConfig, ready: Connection
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    service = build_service()
    await service.start()
    try:
        async with Gateway(service, host=host, port=port, config=config, reuse_port=True):
            ready.send("ready")
            # a worker must not outlive its service (killed -9, it cannot stop us)
            while not stop.is_set() and os.getppid() == parent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
    finally:
        await service.stop()


def _worker_main(
    build_service: ServiceBuilder, host: str, port: int, config: GatewayConfig, ready: Connection
) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(_serve(build_service, host, port, config, ready))
    except Exception as error:  # tell the parent instead of dying silently
        with contextlib.suppress(OSError):
            ready.send(f"error: {error!r}")
        raise


class GatewayWorkers:
    """`count` extra gateway processes on `host:port` (which must already be bound by a
    `Gateway(..., reuse_port=True)` when `port` was 0). `start()` returns once every
    one listens; `stop()` SIGTERMs them and waits (SIGKILL after `grace_s`)."""

    def __init__(
        self,
        build_service: ServiceBuilder,
        host: str,
        port: int,
        count: int,
        config: GatewayConfig | None = None,
    ) -> None:
        self.build_service = build_service
        self.host, self.port, self.count = host, port, count
        self.config = config or GatewayConfig()
        self._procs: list[BaseProcess] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    async def start(self, timeout_s: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        pipes = []
        for i in range(self.count):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(self.build_service, self.host, self.port, self.config, send),
                name=f"megaflow-gateway-{i + 1}",
                daemon=True,
            )
            proc.start()
            send.close()
            self._procs.append(proc)
            pipes.append(receive)
        try:
            for receive in pipes:
                answer = await asyncio.to_thread(self._wait, receive, timeout_s)
                if answer != "ready":
                    raise InfrastructureError(f"a gateway worker did not start: {answer}")
        except BaseException:
            await self.stop()
            raise
        finally:
            for receive in pipes:
                receive.close()

    @staticmethod
    def _wait(receive: Connection, timeout_s: float) -> str:
        if not receive.poll(timeout_s):
            return f"no answer within {timeout_s:g}s"
        try:
            return str(receive.recv())
        except EOFError:
            return "it exited"

    async def stop(self, grace_s: float = 5.0) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.join, grace_s)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, grace_s)

    async def __aenter__(self) -> GatewayWorkers:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
