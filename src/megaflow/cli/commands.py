"""The async bodies of the CLI commands (kept apart from argument parsing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from megaflow.agent.service import AgentServiceImpl
from megaflow.cli.output import RunProgress
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.processes import serve
from megaflow.deploy.run import RunSummary, run_batch
from megaflow.env.service import EnvServiceConfig, LocalEnvironmentService
from megaflow.model.backend import ModelBackend
from megaflow.model.factory import backend_from_spec
from megaflow.model.gateway import Gateway
from megaflow.model.latency import LatencyConfig
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.v1 import scheduler_pb2


async def run_command(
    *,
    tasks: int,
    concurrency: int,
    model: str,
    out: Path,
    seed: int,
    success_rate: float,
    time_scale: float,
    scheduler: str | None,
    sandbox_dir: Path,
    console: Console,
) -> RunSummary:
    specs = generate_tasks(tasks, seed=seed)
    with RunProgress(console, len(specs)) as progress:
        if scheduler:
            client = SchedulerServiceClient(scheduler)
            try:
                return await run_batch(
                    client, specs, out, max_concurrency=concurrency, on_event=progress.update
                )
            finally:
                await client.close()
        backend = backend_from_spec(
            model,
            success_rate=success_rate,
            seed=seed,
            latency=LatencyConfig(time_scale=time_scale),
        )
        system = EmbeddedSystem(
            backends=[backend],
            ledger_path=out / "ledger.sqlite",
            env_config=EnvServiceConfig(root_dir=sandbox_dir, max_environments=max(concurrency, 1)),
        )
        async with system:
            summary = await run_batch(
                system.scheduler, specs, out, max_concurrency=concurrency, on_event=progress.update
            )
            summary.model_utilisation = backend.stats().utilisation
            return summary


async def status_command(address: str) -> scheduler_pb2.StatusResponse:
    client = SchedulerServiceClient(address, timeout_s=10.0)
    try:
        return await client.status(scheduler_pb2.StatusRequest())
    finally:
        await client.close()


async def serve_scheduler_command(listen: str, store: Path) -> None:
    impl = SchedulerServiceImpl(SqliteLedger(store), ServiceResolver())
    await serve("scheduler", impl, listen=listen)


async def serve_model_command(
    listen: str,
    scheduler: str,
    model: str,
    success_rate: float,
    seed: int,
    time_scale: float,
    capacity: int,
    openai_listen: str | None = None,
) -> None:
    latency = LatencyConfig(time_scale=time_scale)
    backend = backend_from_spec(model, success_rate=success_rate, seed=seed, latency=latency)

    def factory(spec: str, **kwargs: Any) -> ModelBackend:  # new versions keep the CLI's settings
        kwargs.setdefault("success_rate", success_rate)
        kwargs.setdefault("seed", seed)
        kwargs.setdefault("latency", latency)
        return backend_from_spec(spec, **kwargs)

    service = ModelServiceImpl([backend], backend_factory=factory)
    if not openai_listen:
        await serve("model", service, listen=listen, scheduler=scheduler, capacity=capacity)
        return
    host, _, port = openai_listen.rpartition(":")
    async with Gateway(service, host=host or "127.0.0.1", port=int(port)) as gateway:
        print(f"megaflow openai-gateway ready on {gateway.base_url}", flush=True)
        await serve("model", service, listen=listen, scheduler=scheduler, capacity=capacity)


async def serve_agent_command(listen: str, scheduler: str, capacity: int) -> None:
    resolver = ServiceResolver()
    impl = AgentServiceImpl(resolver, capacity=capacity)
    try:
        await serve("agent", impl, listen=listen, scheduler=scheduler, capacity=capacity)
    finally:
        await resolver.close()


async def serve_env_command(listen: str, scheduler: str, capacity: int, sandbox_dir: Path) -> None:
    impl = LocalEnvironmentService(
        EnvServiceConfig(root_dir=sandbox_dir, max_environments=capacity)
    )
    await serve("env", impl, listen=listen, scheduler=scheduler, capacity=capacity)
