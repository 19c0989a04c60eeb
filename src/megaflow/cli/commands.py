"""The async bodies of the CLI commands (kept apart from argument parsing)."""

from __future__ import annotations

import functools
import resource
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from megaflow._resume import read_earlier, resume_on_scheduler, write_kept
from megaflow.agent.service import AgentServiceImpl
from megaflow.cli.output import RunProgress
from megaflow.core.errors import InvalidRequestError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.processes import serve
from megaflow.deploy.run import RunSummary, fresh_ledger, run_batch, watch_batch
from megaflow.env.registry import backend_class
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.factory import backend_from_spec
from megaflow.model.gateway import Gateway
from megaflow.model.gateway_workers import GatewayWorkers
from megaflow.model.latency import LatencyConfig
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.clients import SchedulerServiceClient
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler.policy import SchedulerPolicy
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.ledger import TaskLedger
from megaflow.tasks.sources import LoadedTasks
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.tasks.validate import TaskCheck, validate_tasks
from megaflow.v1 import common_pb2, scheduler_pb2

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


class RunPlacement(BaseModel):
    """Where `megaflow run` puts every task's sandbox (from --env, --runtime, --image)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field(
        default="local", min_length=1, description="Sandbox backend (a registered name)."
    )
    runtime: str = Field(default="", description="The backend's runtime (docker: runc, runsc).")
    image: str = Field(default="host", min_length=1, description="Image of every task.")
    docker_host: str | None = Field(
        default=None,
        description="Docker endpoint of the embedded Environment Service; None: no docker.",
    )
    insecure_registries: tuple[str, ...] = Field(
        default=(),
        description="Registries the embedded Environment Service may reach over plain HTTP.",
    )

    def apply(self, task: common_pb2.TaskSpec) -> None:
        """Set ``task``'s image and placement (its mode is kept)."""
        task.image = self.image
        task.placement.backend = self.backend
        task.placement.runtime = self.runtime


def resolve_placement(
    *,
    env: str,
    runtime: str | None,
    image: str | None,
    docker_host: str | None,
    scheduler: str | None,
    environ: Mapping[str, str],
    insecure_registries: Sequence[str] = (),
) -> RunPlacement:
    """Check the `run` options together; InvalidRequestError says what is wrong.

    ``env`` names any registered sandbox backend (`megaflow.env.registry`); the backend
    itself checks the image and runtime."""
    backend = backend_class(env)
    if env != "docker" and docker_host is not None:
        raise InvalidRequestError("--docker-host applies to --env docker only")
    try:
        image, runtime_ = backend.placement(image or "", runtime or "")
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"--env {env} with --image/--runtime: {exc}") from None
    if insecure_registries and scheduler:
        raise InvalidRequestError(
            "--insecure-registry configures the embedded Environment Service; with "
            "--scheduler the Environment Services' own settings apply"
        )
    if env == "docker":
        if scheduler:
            if docker_host is not None:
                raise InvalidRequestError(
                    "--docker-host configures the embedded Environment Service; with "
                    "--scheduler the Environment Services' own settings apply"
                )
        else:
            docker_host = docker_host or environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    return RunPlacement(
        backend=env,
        runtime=runtime_,
        image=image,
        docker_host=docker_host,
        insecure_registries=tuple(insecure_registries),
    )


def run_specs(
    tasks: int, seed: int, placement: RunPlacement, step_timeout_s: float | None = None
) -> list[common_pb2.TaskSpec]:
    """The synthetic tasks of `megaflow run`, placed, with the command budget if given."""
    return place_tasks(generate_tasks(tasks, seed=seed), placement, step_timeout_s)


def place_tasks(
    specs: list[common_pb2.TaskSpec],
    placement: RunPlacement,
    step_timeout_s: float | None = None,
    keep_images: bool = False,
) -> list[common_pb2.TaskSpec]:
    """A loaded task set placed like `run_specs` (own images kept with `keep_images`)."""
    for spec in specs:
        image = spec.image
        placement.apply(spec)
        if keep_images and image:
            spec.image = image
        if step_timeout_s is not None:
            spec.budgets.step_timeout_s = step_timeout_s
    return specs


async def validate_command(
    loaded: LoadedTasks, concurrency: int, sandbox_dir: Path
) -> list[TaskCheck]:
    """`megaflow validate`: every task with its gold solution, then unpatched."""
    config = EnvServiceConfig(root_dir=sandbox_dir, max_environments=max(concurrency, 1))
    async with SandboxEnvironmentService(config) as env:
        return await validate_tasks(env, loaded, concurrency=concurrency)


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
    placement: RunPlacement | None = None,
    step_timeout_s: float | None = None,
    task_specs: list[common_pb2.TaskSpec] | None = None,
    keep_images: bool = False,
    resume: str | None = None,
    scaffold: common_pb2.ScaffoldSpec | None = None,
) -> RunSummary:
    """`task_specs`: run these (a loaded task set) instead of `tasks` synthetic ones; with
    `keep_images` each keeps its own image (no --image given). `scaffold`: of every task
    that names none."""
    placement = placement or RunPlacement()
    if task_specs is None:
        specs = run_specs(tasks, seed, placement, step_timeout_s)
    else:
        specs = place_tasks(task_specs, placement, step_timeout_s, keep_images)
    if scaffold is not None:
        for spec in specs:
            if not spec.scaffold.type:
                spec.scaffold.CopyFrom(scaffold)
    kept: list[dict[str, Any]] = []
    if resume and not scheduler:  # an earlier run's folder: keep its scored tasks
        earlier = await read_earlier(Path(resume))
        write_kept(earlier, out)
        specs = [spec for spec in specs if spec.task_id not in earlier.results]
        kept = list(earlier.records.values())
        console.print(f"resuming {resume}: {len(kept)} scored tasks kept, {len(specs)} to run")
        if not specs:
            return RunSummary(total=len(kept), records=kept)

    def announce(run_id: str) -> None:  # early, so that `megaflow watch RUN_ID` can re-attach
        console.print(f"run id: {run_id}")

    with RunProgress(console, len(specs)) as progress:
        if scheduler and resume:  # a run id on that scheduler
            return await resume_on_scheduler(
                scheduler,
                resume,
                specs,
                out,
                concurrency=concurrency,
                on_submitted=announce,
                on_event=progress.update,
            )
        if scheduler:
            client = SchedulerServiceClient(scheduler)
            try:
                return await run_batch(
                    client,
                    specs,
                    out,
                    max_concurrency=concurrency,
                    on_event=progress.update,
                    on_submitted=announce,
                    collect=False,
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
            ledger_path=await fresh_ledger(
                out,
                lambda: console.print(f"replacing the previous run's outputs in {out}"),
            ),
            env_config=EnvServiceConfig(
                root_dir=sandbox_dir,
                max_environments=max(concurrency, 1),
                docker_host=placement.docker_host,
                insecure_registries=placement.insecure_registries,
            ),
        )
        async with system:
            summary = await run_batch(
                system.scheduler,
                specs,
                out,
                max_concurrency=concurrency,
                on_event=progress.update,
                on_submitted=announce,
                collect=False,
                append=bool(kept),
            )
            if backend.kind == "simulated":  # an upstream's utilisation is not known
                summary.model_utilisation = backend.stats().utilisation
        summary.records[:0] = kept
        summary.total += len(kept)
        return summary


async def watch_command(
    address: str, run_id: str, out: Path | None, console: Console
) -> RunSummary:
    """Follow run `run_id` on the scheduler at `address` to its end (see `megaflow watch`)."""
    client = SchedulerServiceClient(address)
    try:
        with RunProgress(console, None) as progress:
            return await watch_batch(client, run_id, out, on_event=progress.update, collect=False)
    finally:
        await client.close()


async def status_command(address: str) -> scheduler_pb2.StatusResponse:
    client = SchedulerServiceClient(address, timeout_s=10.0)
    try:
        return await client.status(scheduler_pb2.StatusRequest())
    finally:
        await client.close()


def load_policy(path: Path) -> SchedulerPolicy:
    """The SchedulerPolicy in a JSON file; ValueError says what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return SchedulerPolicy.model_validate_json(text)
    except ValidationError as error:
        raise ValueError(f"{path} is not a valid scheduler policy: {error}") from None


async def serve_scheduler_command(
    listen: str,
    ledger: TaskLedger,
    policy: SchedulerPolicy | None = None,
    heartbeat_interval_s: float = 2.0,
) -> None:
    impl = SchedulerServiceImpl(
        ledger, ServiceResolver(), policy=policy, heartbeat_interval_s=heartbeat_interval_s
    )
    await serve("scheduler", impl, listen=listen)


def parse_listen(address: str) -> tuple[str, int]:
    """`HOST:PORT` (HOST may be empty: 127.0.0.1) as a pair; ValueError says what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


def model_service(
    model: str, success_rate: float, seed: int, time_scale: float
) -> ModelServiceImpl:
    """The Model Service of `megaflow serve model` (module-level: gateway workers build
    their own copy from a `functools.partial` of it)."""
    latency = LatencyConfig(time_scale=time_scale)
    backend = backend_from_spec(model, success_rate=success_rate, seed=seed, latency=latency)
    # new versions keep the CLI's settings unless UpdateWeights gives others
    factory = functools.partial(
        backend_from_spec, success_rate=success_rate, seed=seed, latency=latency
    )
    return ModelServiceImpl([backend], backend_factory=factory)


async def serve_model_command(
    listen: str,
    scheduler: str,
    model: str,
    success_rate: float,
    seed: int,
    time_scale: float,
    capacity: int,
    openai_listen: str | None = None,
    gateway_workers: int = 1,
    advertise: str | None = None,
) -> None:
    """The Model Service over gRPC; with `openai_listen`, its OpenAI gateway too, served by
    `gateway_workers` processes sharing that port (megaflow.model.gateway_workers)."""
    build = functools.partial(model_service, model, success_rate, seed, time_scale)
    service = build()
    if not openai_listen:
        await serve(
            "model",
            service,
            listen=listen,
            scheduler=scheduler,
            capacity=capacity,
            advertise=advertise,
        )
        return
    host, port = parse_listen(openai_listen)
    # one socket per client connection: thousands of agents need more than a default
    # soft limit of 1,024 open files (the workers inherit the raised limit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    reuse_port = gateway_workers > 1
    async with Gateway(service, host=host, port=port, reuse_port=reuse_port) as gateway:
        workers = GatewayWorkers(build, gateway.host, gateway.port, gateway_workers - 1)
        async with workers:
            print(f"megaflow openai-gateway ready on {gateway.base_url}", flush=True)
            await serve(
                "model",
                service,
                listen=listen,
                scheduler=scheduler,
                capacity=capacity,
                advertise=advertise,
            )


async def serve_agent_command(
    listen: str,
    scheduler: str,
    capacity: int,
    store: TaskLedger | None = None,
    advertise: str | None = None,
) -> None:
    """`store`: where the agents checkpoint (opened and closed by the service)."""
    resolver = ServiceResolver()
    impl = AgentServiceImpl(resolver, capacity=capacity, store=store, own_store=True)
    try:
        await serve(
            "agent",
            impl,
            listen=listen,
            scheduler=scheduler,
            capacity=capacity,
            advertise=advertise,
        )
    finally:
        await resolver.close()


def parse_warm_pool(items: list[str]) -> dict[str, int]:
    """`IMAGE=N` pairs (from --warm-pool) as a mapping; ValueError says which is wrong."""
    pools: dict[str, int] = {}
    for item in items:
        image, sep, size = item.rpartition("=")
        if not sep or not image or not size.isdigit():
            raise ValueError(f"--warm-pool {item!r}: expected IMAGE=N, e.g. host=8")
        pools[image] = int(size)
    return pools


async def serve_env_command(
    listen: str,
    scheduler: str,
    capacity: int,
    sandbox_dir: Path,
    docker_host: str | None = None,
    warm_pool: dict[str, int] | None = None,
    artifact_url: str = "",
    insecure_registries: Sequence[str] = (),
    advertise: str | None = None,
) -> None:
    config = EnvServiceConfig(
        root_dir=sandbox_dir,
        max_environments=capacity,
        docker_host=docker_host,
        warm_pool=warm_pool or {},
        artifact_url=artifact_url,
        insecure_registries=tuple(insecure_registries),
    )
    impl = SandboxEnvironmentService(config)
    await serve(
        "env", impl, listen=listen, scheduler=scheduler, capacity=capacity, advertise=advertise
    )
