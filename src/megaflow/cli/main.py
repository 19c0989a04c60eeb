"""The `megaflow` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from megaflow.cli import output
from megaflow.core.errors import AuthenticationError, InvalidRequestError
from megaflow.env.service import EnvServiceConfig

if TYPE_CHECKING:
    from megaflow.tasks.sources import LoadedTasks
    from megaflow.v1 import common_pb2

app = typer.Typer(
    help="MegaFlow: agent tasks at scale.", no_args_is_help=True, add_completion=False
)
serve_app = typer.Typer(help="Run one service as its own process.", no_args_is_help=True)
env_app = typer.Typer(help="Environment maintenance.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(env_app, name="env")

console = Console(stderr=True)

DEFAULT_SANDBOX_DIR = EnvServiceConfig().root_dir
LogLevel = Annotated[str, typer.Option(help="Python log level.")]
Listen = Annotated[str, typer.Option(help="host:port to listen on (port 0: any free port).")]
Advertise = Annotated[
    str | None,
    typer.Option(
        help="HOST[:PORT] the scheduler and other services reach this one at (default: "
        "the --listen address; needed with --listen 0.0.0.0:PORT; no port: the one it "
        "listens on)."
    ),
]
SchedulerAddr = Annotated[str, typer.Option("--scheduler", help="Scheduler address host:port.")]
TasksFrom = Annotated[
    Path | None,
    typer.Option(
        help="Run this task set instead of synthetic tasks: a JSONL / Parquet file or "
        "`datasets` directory of SWE-bench or native rows, or Harbor task directories."
    ),
]
SourceConfig = Annotated[
    str | None,
    typer.Option(
        help="JSON settings of the task source, e.g. "
        '\'{"git_url_template": "file:///srv/{repo}.git", "specs": {...}}\' '
        "(see docs/task-sources.md)."
    ),
]


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


AuthTokenFile = Annotated[
    Path | None,
    typer.Option(
        "--auth-token-file",
        help="File holding the deployment's shared token (mode 600), sent and checked on "
        "every RPC; default: $MEGAFLOW_AUTH_TOKEN_FILE or $MEGAFLOW_AUTH_TOKEN.",
        rich_help_panel="Control-plane security",
    ),
]
TlsCert = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        help="PEM certificate this process presents (mutual TLS, with --tls-key and "
        "--tls-ca); default: $MEGAFLOW_TLS_CERT.",
        rich_help_panel="Control-plane security",
    ),
]
TlsKey = Annotated[
    Path | None,
    typer.Option(
        "--tls-key",
        help="Its PEM private key (mode 600); default: $MEGAFLOW_TLS_KEY.",
        rich_help_panel="Control-plane security",
    ),
]
TlsCa = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        help="PEM CA certificate the other side's certificate must be signed by; "
        "default: $MEGAFLOW_TLS_CA.",
        rich_help_panel="Control-plane security",
    ),
]
TlsServerName = Annotated[
    str | None,
    typer.Option(
        "--tls-server-name",
        help="Name to check in servers' certificates instead of each address's host "
        "(one certificate shared by every host); default: $MEGAFLOW_TLS_SERVER_NAME.",
        rich_help_panel="Control-plane security",
    ),
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Allow a non-loopback --listen without a token or mutual TLS (anyone who "
        "can reach the port can then use the service).",
        rich_help_panel="Control-plane security",
    ),
]


def _security(
    token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    tls_server_name: str | None,
    insecure: bool = False,
) -> None:
    """Set this process's control-plane credentials (every gRPC server and client it
    builds uses them); a bad setting is a usage error (exit 2)."""
    from megaflow.rpc import auth

    given = token_file or tls_cert or tls_key or tls_ca or tls_server_name or insecure
    try:
        security = auth.load(
            token_file=token_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            tls_server_name=tls_server_name,
            insecure=insecure,
        )
        # No option: the environment's settings, read at each use (as from the API); an
        # earlier command in this process (a test, a notebook) leaves nothing behind.
        auth.configure(security if given else None)
    except InvalidRequestError as exc:
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None


def _check_listen(listen: str, option: str, insecure: bool, *, why: str) -> None:
    """An HTTP listener with no authentication of its own: a non-loopback bind needs
    --insecure (exit 2 otherwise)."""
    from megaflow.rpc.auth import is_loopback

    host = listen.rpartition(":")[0]
    if host and not is_loopback(host) and not insecure:
        console.print(
            f"[red]error[/]: refusing {option} {listen}: {why}; bind it to loopback "
            "(127.0.0.1) and put an authenticating proxy in front, or pass --insecure"
        )
        raise typer.Exit(2)


InsecureRegistry = Annotated[
    list[str] | None,
    typer.Option(
        "--insecure-registry",
        help="HOST[:PORT] of a registry that local-backend images (docker://, registry:) "
        "may be pulled from over plain HTTP or unverified TLS (repeatable; all others: "
        "HTTPS, verified). Credentials: $REGISTRY_AUTH_FILE or ~/.docker/config.json.",
    ),
]


@app.command()
def run(
    tasks: Annotated[int, typer.Option(min=1, help="Number of synthetic tasks.")] = 32,
    concurrency: Annotated[int, typer.Option(min=1, help="Hard cap on tasks in flight.")] = 8,
    model: Annotated[
        str, typer.Option(help="'simulated' or 'openai:http://HOST:PORT[#model]'.")
    ] = "simulated",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for results.jsonl and trajectories.jsonl "
            "[default: the --resume folder, else megaflow-out]."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the task generator and the simulated policy.")
    ] = 0,
    success_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Simulated policy's success rate.")
    ] = 0.8,
    time_scale: Annotated[
        float, typer.Option(min=0.0, help="Scale of the simulated GPU's latencies (0: none).")
    ] = 1.0,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Submit to a running scheduler at host:port.")
    ] = None,
    sandbox_dir: Annotated[
        Path, typer.Option(help="Where local sandboxes live (embedded mode).")
    ] = DEFAULT_SANDBOX_DIR,
    env: Annotated[
        str,
        typer.Option(
            "--env",
            help="Sandbox backend of every task: 'local' (bubblewrap), 'docker', or any "
            "backend registered in the 'megaflow.backends' entry-point group.",
        ),
    ] = "local",
    runtime: Annotated[
        str | None,
        typer.Option(
            help="Container runtime with --env docker: 'runc' (default) or 'runsc' (gVisor)."
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="Image of every task: 'host' (default) or a dir:/tar:/oci:/docker:// "
            "reference with --env local; a local Docker image name (required) with --env docker."
        ),
    ] = None,
    docker_host: Annotated[
        str | None,
        typer.Option(
            help="Docker Engine endpoint with --env docker (embedded mode); "
            "default: $DOCKER_HOST, else unix:///var/run/docker.sock."
        ),
    ] = None,
    step_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Budget of each command in seconds (a command past it is killed and the "
            "agent told so; a sandbox found hung then fails the attempt, which is retried). "
            "Default: the agent's (60 s).",
        ),
    ] = None,
    insecure_registry: InsecureRegistry = None,
    tasks_from: TasksFrom = None,
    source_config: SourceConfig = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="OUT_DIR of an earlier embedded run of the same tasks (or a RUN_ID with "
            "--scheduler): run only its tasks that have no scored result, keeping the others."
        ),
    ] = None,
    scaffold: Annotated[
        str | None,
        typer.Option(
            help="The agent scaffold of every task that names none: a name (tool-agent, "
            "mini-swe-agent, qwen-code, command, an entry point or package.module:Class) or "
            'a JSON object {"type": NAME, ...its config}.'
        ),
    ] = None,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    log_level: LogLevel = "warning",
) -> None:
    """Run N synthetic software-engineering tasks and write trajectories and rewards.

    --tasks-from PATH runs a task set instead (JSONL, Parquet, a `datasets` directory or
    Harbor task directories): bad rows are listed with row and field, the good ones run.

    With --model openai:URL[#model] the server is checked first (GET /v1/models, 3 s):
    unreachable, no or wrong key (OPENAI_API_KEY), or a model it does not serve is one
    error and exit status 2, before any task starts. Exit status 1 when any task ends
    without a result (infrastructure failure, invalid, cancelled).

    --env docker --image NAME runs each task in a Docker container (--runtime runsc: gVisor)."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name)
    if not scheduler:  # our model: check its server before the heavy imports, and any task
        from megaflow.cli.preflight import check_model_spec

        try:
            check_model_spec(model)
        except InvalidRequestError as exc:
            console.print(f"[red]error[/]: {exc}")
            raise typer.Exit(2) from None
    from megaflow.cli.commands import resolve_placement, run_command

    chosen = _scaffold_option(scaffold, check=not scheduler) if scaffold else None
    try:
        placement = resolve_placement(
            env=env,
            runtime=runtime,
            image=image,
            docker_host=docker_host,
            scheduler=scheduler,
            environ=os.environ,
            insecure_registries=insecure_registry or (),
        )
    except InvalidRequestError as exc:
        raise typer.BadParameter(str(exc)) from None
    loaded = None
    if tasks_from is not None:
        loaded = _load_task_set(tasks_from, source_config)
        tasks = len(loaded.tasks)
    if resume and not scheduler and not Path(resume).is_dir():
        raise typer.BadParameter(
            f"{resume}: no such folder (a run id needs --scheduler)", param_hint="--resume"
        )
    _logging(log_level)
    if out is None:
        out = Path(resume) if resume and not scheduler else Path("megaflow-out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = asyncio.run(
            run_command(
                tasks=tasks,
                concurrency=concurrency,
                model=model,
                out=out,
                seed=seed,
                success_rate=success_rate,
                time_scale=time_scale,
                scheduler=scheduler,
                sandbox_dir=sandbox_dir,
                console=console,
                placement=placement,
                step_timeout_s=step_timeout,
                task_specs=loaded.tasks if loaded is not None else None,
                keep_images=image is None,
                resume=resume,
                scaffold=chosen,
            )
        )
    except (InvalidRequestError, AuthenticationError) as exc:  # e.g. a run going in --out
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        # asyncio.run cancelled the run; every sandbox was released on the way out.
        done = output.count_lines(out / "results.jsonl")
        console.print(
            f"[yellow]interrupted[/]: {done} of {tasks} tasks finished; "
            f"their results are in {out / 'results.jsonl'}"
        )
        raise typer.Exit(130) from None
    output.print_summary(console, summary, out)
    if loaded is not None and loaded.errors:
        from megaflow.cli import tasks_output

        tasks_output.print_row_errors(console, loaded.errors)
        raise typer.Exit(1)
    # A task without a result (infra, invalid, cancelled, never finished) fails the run.
    complete = summary.finished == summary.total and not summary.unscored
    raise typer.Exit(0 if complete else 1)


def _scaffold_option(value: str, *, check: bool) -> common_pb2.ScaffoldSpec:
    """--scaffold as a `ScaffoldSpec`; with `check` (the agents run here) an unknown
    scaffold or a bad config is a usage error now, not an `invalid` result per task."""
    from megaflow._tasks import scaffold_spec
    from megaflow.agent.scaffold import scaffold_factory

    try:
        raw: str | dict[str, Any] = value
        if value.lstrip().startswith(("{", "[")):
            raw = json.loads(value)
            if not isinstance(raw, dict):
                raise InvalidRequestError("--scaffold JSON must be an object")
        spec = scaffold_spec(raw)
        if check:
            scaffold_factory(spec)
    except (ValueError, InvalidRequestError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--scaffold") from None
    return spec


def _load_task_set(path: Path, settings: str | None) -> LoadedTasks:
    """The tasks at ``path``; an unreadable set is a usage error (exit 2)."""
    from megaflow.cli import tasks_output
    from megaflow.tasks.sources import load_tasks

    try:
        loaded = load_tasks(path, settings)
    except InvalidRequestError as exc:
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    if loaded.errors:
        tasks_output.print_row_errors(console, loaded.errors)
    if not loaded.tasks:
        console.print(f"[red]error[/]: no good task in {path}")
        raise typer.Exit(2)
    return loaded


@app.command()
def validate(
    tasks_from: Annotated[
        Path, typer.Option(help="The task set: JSONL, Parquet, `datasets` dir or Harbor dirs.")
    ],
    source_config: SourceConfig = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks validated at once.")] = 4,
    image: Annotated[
        str | None, typer.Option(help="Image of every task (default: each task's own).")
    ] = None,
    sandbox_dir: Annotated[
        Path, typer.Option(help="Where local sandboxes live.")
    ] = DEFAULT_SANDBOX_DIR,
    log_level: LogLevel = "warning",
) -> None:
    """Check a task set with its gold solutions and no model, as the SWE-bench harness
    does: each task must score 1 with its gold patch (or solution/solve.sh) and 0 as it
    comes. Lists the broken ones and why; exit status 1 if any is broken or a row is bad."""
    from megaflow.cli import tasks_output
    from megaflow.cli.commands import validate_command

    loaded = _load_task_set(tasks_from, source_config)
    if image is not None:
        for task in loaded.tasks:
            task.image = image
    _logging(log_level)
    checks = asyncio.run(validate_command(loaded, concurrency, sandbox_dir))
    broken = tasks_output.print_validation(console, checks)
    if loaded.errors:
        tasks_output.print_row_errors(console, loaded.errors)
    raise typer.Exit(1 if broken or loaded.errors else 0)


@app.command()
def watch(
    run_id: Annotated[str, typer.Argument(help="The run's id (`megaflow run` prints it).")],
    scheduler: SchedulerAddr = "127.0.0.1:7070",
    out: Annotated[
        Path | None,
        typer.Option(help="Rewrite results.jsonl and trajectories.jsonl of the whole run here."),
    ] = None,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    log_level: LogLevel = "warning",
) -> None:
    """Re-attach to a run on a scheduler (e.g. after its client died) and follow it to
    the end: its finished tasks first, then the rest as they finish."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name)
    from megaflow.cli.commands import watch_command
    from megaflow.core.errors import MegaFlowError

    _logging(log_level)
    try:
        summary = asyncio.run(watch_command(scheduler, run_id, out, console))
    except MegaFlowError as exc:  # an unknown run, a scheduler that stays down
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # the run goes on; watch it again
    output.print_summary(console, summary, out)
    raise typer.Exit(0)


@app.command()
def status(
    scheduler: SchedulerAddr = "127.0.0.1:7070",
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
) -> None:
    """Show a running scheduler's queue and services."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name)
    from megaflow.cli.commands import status_command
    from megaflow.core.errors import MegaFlowError

    try:
        reply = asyncio.run(status_command(scheduler))
    except MegaFlowError as exc:  # unreachable, or credentials refused
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    output.print_status(console, reply)


@serve_app.command("scheduler")
def serve_scheduler(
    listen: Listen = "127.0.0.1:7070",
    store: Annotated[
        str,
        typer.Option(
            help="The ledger: a SQLite file path or sqlite:///ABS/PATH, "
            "redis://HOST:PORT/DB (DB optional), or etcd://HOST:PORT."
        ),
    ] = "megaflow-ledger.sqlite",
    policy: Annotated[
        Path | None,
        typer.Option(
            help="A JSON file of SchedulerPolicy settings: quotas, pools, model rate "
            "limits, placement, retries (see megaflow.scheduler.policy)."
        ),
    ] = None,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            min=0.1, help="Seconds between service heartbeats; a service is lost after two."
        ),
    ] = 2.0,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
) -> None:
    """The scheduler: queue, ledger, placement."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name, insecure)
    from megaflow.cli.commands import load_policy, serve_scheduler_command
    from megaflow.store.factory import open_ledger

    try:
        settings = load_policy(policy) if policy is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from None
    try:
        ledger = open_ledger(store)
    except InvalidRequestError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from None
    _logging(log_level)
    asyncio.run(serve_scheduler_command(listen, ledger, settings, heartbeat_interval))


@serve_app.command("model")
def serve_model(
    scheduler: Annotated[
        str,
        typer.Option(
            "--scheduler",
            help="Scheduler address host:port to register with. Empty: do not register "
            "(e.g. a standalone OpenAI gateway).",
        ),
    ] = "",
    listen: Listen = "127.0.0.1:0",
    model: Annotated[
        str, typer.Option(help="'simulated' or 'openai:http://HOST:PORT[#model]'.")
    ] = "simulated",
    success_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.8,
    seed: int = 0,
    time_scale: Annotated[float, typer.Option(min=0.0)] = 1.0,
    capacity: Annotated[
        int, typer.Option(min=1, help="Concurrent requests, for load balancing.")
    ] = 256,
    openai_listen: Annotated[
        str | None,
        typer.Option(
            help="host:port of an OpenAI-compatible gateway in front of this service "
            "(/v1/chat/completions, /v1/completions, /v1/models; port 0: any free port)."
        ),
    ] = None,
    gateway_workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes serving --openai-listen, sharing its port (SO_REUSEPORT); "
            "each extra one runs its own copy of the Model Service (docs/architecture.md).",
        ),
    ] = 1,
    advertise: Advertise = None,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
) -> None:
    """A Model Service (and, with --openai-listen, its OpenAI-compatible gateway)."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name, insecure)
    from megaflow.cli.commands import parse_listen, serve_model_command

    if openai_listen is not None:
        try:
            parse_listen(openai_listen)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--openai-listen") from None
        _check_listen(
            openai_listen,
            "--openai-listen",
            insecure,
            why="the OpenAI gateway checks no shared key (its per-task keys are issued "
            "in-process only), so anyone who can reach it can use the model",
        )
    elif gateway_workers > 1:
        raise typer.BadParameter("needs --openai-listen", param_hint="--gateway-workers")
    from megaflow.cli.preflight import check_model_spec

    try:  # a wrong key or model name is one clear error (a server still starting is not)
        check_model_spec(model, allow_unreachable=True)
    except InvalidRequestError as exc:
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    _logging(log_level)
    asyncio.run(
        serve_model_command(
            listen,
            scheduler,
            model,
            success_rate,
            seed,
            time_scale,
            capacity,
            openai_listen=openai_listen,
            gateway_workers=gateway_workers,
            advertise=advertise,
        )
    )


@serve_app.command("agent")
def serve_agent(
    scheduler: SchedulerAddr,
    listen: Listen = "127.0.0.1:0",
    capacity: Annotated[int, typer.Option(min=1, help="Concurrent agent loops.")] = 10_000,
    store: Annotated[
        str,
        typer.Option(
            help="Where agents checkpoint, to resume a task on another worker: the "
            "scheduler's store (a SQLite path or sqlite:///ABS/PATH, redis://HOST:PORT/DB, "
            "etcd://HOST:PORT). Empty: no checkpoints."
        ),
    ] = "",
    advertise: Advertise = None,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
) -> None:
    """An Agent Service."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name, insecure)
    from megaflow.cli.commands import serve_agent_command
    from megaflow.store.factory import open_ledger

    try:
        ledger = open_ledger(store) if store else None
    except InvalidRequestError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from None
    _logging(log_level)
    asyncio.run(serve_agent_command(listen, scheduler, capacity, ledger, advertise))


@serve_app.command("env")
def serve_env(
    scheduler: SchedulerAddr,
    listen: Listen = "127.0.0.1:0",
    capacity: Annotated[int, typer.Option(min=1, help="Live sandboxes at most.")] = 512,
    sandbox_dir: Annotated[Path, typer.Option(help="Where sandboxes live.")] = DEFAULT_SANDBOX_DIR,
    docker_host: Annotated[
        str | None, typer.Option(help="Docker endpoint: enables placement.backend 'docker'.")
    ] = None,
    warm_pool: Annotated[
        list[str] | None,
        typer.Option(help="IMAGE=N: keep N started sandboxes of IMAGE ready (repeatable)."),
    ] = None,
    artifact_url: Annotated[
        str, typer.Option(help="Where snapshots go: a directory or any fsspec URL.")
    ] = "",
    insecure_registry: InsecureRegistry = None,
    advertise: Advertise = None,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
) -> None:
    """An Environment Service (local bubblewrap sandboxes; Docker with --docker-host)."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name, insecure)
    from megaflow.cli.commands import parse_warm_pool, serve_env_command

    _logging(log_level)
    try:
        pools = parse_warm_pool(warm_pool or [])
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    asyncio.run(
        serve_env_command(
            listen,
            scheduler,
            capacity,
            sandbox_dir,
            docker_host,
            pools,
            artifact_url,
            insecure_registry or (),
            advertise,
        )
    )


@serve_app.command("openenv")
def serve_openenv(
    listen: Listen = "127.0.0.1:8000",
    env_address: Annotated[
        str | None,
        typer.Option(
            "--env",
            help="A running Environment Service (host:port); default: local sandboxes "
            "in this process.",
        ),
    ] = None,
    image: Annotated[str, typer.Option(help="Image of a session whose reset names none.")] = (
        "host"
    ),
    max_sessions: Annotated[int, typer.Option(min=1, help="WebSocket sessions at once.")] = 256,
    idle_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds without a message before a session ends.")
    ] = 600.0,
    capacity: Annotated[
        int, typer.Option(min=1, help="Live sandboxes at most (embedded sandboxes).")
    ] = 512,
    sandbox_dir: Annotated[
        Path, typer.Option(help="Where sandboxes live (embedded sandboxes).")
    ] = DEFAULT_SANDBOX_DIR,
    writable_dir: Annotated[
        list[str] | None,
        typer.Option(
            help="An absolute folder every embedded sandbox may write besides /workspace "
            "and /tmp (repeatable; Harbor tasks need /logs, /tests, /solution).",
        ),
    ] = None,
    auth_token_file: AuthTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_server_name: TlsServerName = None,
    insecure: Insecure = False,
    log_level: LogLevel = "info",
) -> None:
    """An OpenEnv-compatible environment server (HTTP and per-session WebSocket /ws):
    each session is one MegaFlow sandbox (see docs/openenv.md)."""
    _security(auth_token_file, tls_cert, tls_key, tls_ca, tls_server_name, insecure)
    from megaflow.integrations.openenv import OpenEnvConfig, serve

    _check_listen(
        listen,
        "--listen",
        insecure,
        why="the OpenEnv server has no authentication: anyone who can reach it can run "
        "commands in sandboxes",
    )
    _logging(log_level)
    config = OpenEnvConfig(image=image, max_sessions=max_sessions, idle_timeout_s=idle_timeout)
    backends = {"local": {"writable_dirs": writable_dir}} if writable_dir else {}
    env_config = EnvServiceConfig(
        root_dir=sandbox_dir, max_environments=capacity, backends=backends
    )
    asyncio.run(serve(listen, config, env_address=env_address, env_config=env_config))


@env_app.command("gc")
def env_gc(
    sandbox_dir: Annotated[Path, typer.Option(help="Where sandboxes live.")] = DEFAULT_SANDBOX_DIR,
) -> None:
    """Reclaim sandboxes whose owning process is gone."""
    from megaflow.env.local import reclaim_orphans

    count = reclaim_orphans(sandbox_dir) if sandbox_dir.exists() else 0
    console.print(f"reclaimed {count} sandbox(es) under {sandbox_dir}")


if __name__ == "__main__":  # `python -m megaflow.cli` is the lighter way in
    from megaflow.cli.entry import main

    main()
