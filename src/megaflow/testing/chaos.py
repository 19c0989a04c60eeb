"""A chaos driver: a live multi-process deployment, a seeded schedule of faults, checks.

`run_chaos` starts a scheduler (fixed address; its store a SQLite file, or a private
redis-server or etcd that the driver keeps up), two agent services (checkpointing to the
store), two env services (real local sandboxes), two simulated model services and
`megaflow run --scheduler` as a client. While the run goes it makes, at seeded points
of the run's progress:

- kill -9 of the scheduler, an agent, an env and a model replica, each restarted (the
  scheduler on its address and store; the others on new ports, re-registering; an env
  on its sandbox folder, so that it reclaims the orphans);
- sandbox kills (bwrap SIGKILLed from outside) and hangs (a sandbox frozen from
  outside, so that its command never answers), see :mod:`.chaos_faults`.

`check_all` (:mod:`.chaos_checks`) then checks exactly-once results, true rewards and
that nothing is left behind; `format_report` prints the figures.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from megaflow.testing.chaos_checks import (
    KINDS,
    MORE_KINDS,
    SANDBOX_KINDS,
    SERVICE_KINDS,
    check_all,
    format_report,
    read_ledger,
    report,
)
from megaflow.testing.chaos_faults import LedgerView, hang_sandbox, kill_sandbox
from megaflow.testing.etcd_server import EtcdServer
from megaflow.testing.processes import ServiceProcess, kill_group, start_run
from megaflow.testing.redis_server import RedisServer
from megaflow.testing.server import free_port

__all__ = [
    "KINDS",
    "MORE_KINDS",
    "ChaosConfig",
    "ChaosStopped",
    "check_all",
    "format_report",
    "report",
    "run_chaos",
]
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (.*)$", re.M)


class ChaosConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: int = Field(60, ge=1, description="Tasks submitted by the client.")
    concurrency: int = Field(16, ge=1, description="The client's cap on tasks in flight.")
    seed: int = Field(0, description="Seed of the fault schedule (the policy's seed is 0).")
    success_rate: float = Field(0.8, ge=0.0, le=1.0, description="Simulated policy's rate.")
    time_scale: float = Field(1.0, ge=0.0, description="Simulated model latency scale.")
    kills_per_kind: int = Field(1, ge=0, description="kill -9s of each kind of service.")
    sandbox_faults: int = Field(
        1, ge=0, description="Sandbox kills, and as many sandbox hangs, during the run."
    )
    step_timeout_s: float = Field(
        10.0, gt=0, description="Command budget of the tasks: how long a hang goes unnoticed."
    )
    store: Literal["sqlite", "redis", "etcd"] = Field(
        "sqlite",
        description="The scheduler's and agents' store: a SQLite file, redis-server or etcd.",
    )
    env_hangs: int = Field(
        0,
        ge=0,
        description="Env hosts stopped (SIGSTOP) until the scheduler drops them, then "
        "continued (SIGCONT): a host that hangs instead of dying.",
    )
    store_restarts: int = Field(
        0,
        ge=0,
        description="kill -9s of the store's server (redis-server or etcd), each restarted "
        "at once on its data (not with the SQLite store).",
    )
    window: tuple[float, float] = Field(
        (0.1, 0.75), description="Kills happen at these fractions of tasks finished."
    )
    min_gap: int = Field(
        3, ge=0, description="Tasks finished between one restart and the next kill, at least."
    )
    run_timeout_s: float = Field(600.0, gt=0, description="Bound on the whole run.")
    compare_undisturbed: bool = Field(
        True, description="Also run the same tasks undisturbed (embedded) and compare."
    )


class Kill(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(description="scheduler, agent, env, model, sandbox or hang.")
    name: str = Field(description="Which process (e.g. agent1); sandbox faults: 'sandbox'.")
    at_fraction: float = Field(description="Scheduled at this fraction of tasks finished.")


def schedule(config: ChaosConfig) -> list[Kill]:
    """The seeded fault schedule, in order of progress."""
    rng = random.Random(config.seed)
    low, high = config.window
    kills = [
        Kill(
            kind=kind,
            name=kind if kind == "scheduler" else f"{kind}{rng.randint(1, 2)}",
            at_fraction=round(rng.uniform(low, high), 3),
        )
        for kind in SERVICE_KINDS
        for _ in range(config.kills_per_kind)
    ]
    kills += [
        Kill(kind=kind, name="sandbox", at_fraction=round(rng.uniform(low, high), 3))
        for kind in SANDBOX_KINDS
        for _ in range(config.sandbox_faults)
    ]
    kills += [  # (drawn after the others: the CI suite's schedule stays as it was)
        Kill(kind="env_hang", name=f"env{rng.randint(1, 2)}",
             at_fraction=round(rng.uniform(low, high), 3))
        for _ in range(config.env_hangs)
    ] + [
        Kill(kind="store", name="store", at_fraction=round(rng.uniform(low, high), 3))
        for _ in range(config.store_restarts)
    ]  # fmt: skip
    return sorted(kills, key=lambda k: k.at_fraction)


class ChaosStopped(RuntimeError):
    """The run was asked to stop; its processes were stopped first."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise ChaosStopped("the chaos run was asked to stop")


def _wait(proc: subprocess.Popen[str], timeout_s: float, stop: threading.Event | None) -> int:
    """``proc``'s exit status; ChaosStopped as soon as ``stop`` is set, TimeoutError
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check(stop)
        try:
            return proc.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the run did not finish in {timeout_s:g} s") from None


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Deployment:
    """The service processes of one chaos run, by name; restarts keep their settings."""

    def __init__(
        self, workdir: Path, config: ChaosConfig, store: str, same_address: tuple[str, ...] = ()
    ) -> None:
        """`same_address`: the services (by name) that listen on a fixed address, so that
        a restart comes back where it was (a host restarted in place); the others take a
        free port at each start."""
        self.workdir = workdir
        self.config = config
        self.store = store
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, ServiceProcess] = {}
        self.pgids: list[int] = []
        self.env_pids: list[int] = []
        self.starts: dict[str, int] = {}
        self.fixed = {name: f"127.0.0.1:{free_port()}" for name in same_address}

    def sandbox_dir(self, name: str) -> Path:
        return self.workdir / f"sandboxes-{name}"

    def _argv(self, name: str) -> tuple[str, ...]:
        listen = ("--listen", self.fixed[name]) if name in self.fixed else ()
        return (*self._service_argv(name), *listen)

    def _service_argv(self, name: str) -> tuple[str, ...]:
        sched = ("--scheduler", self.address)
        if name == "scheduler":
            return ("--listen", self.address, "--store", self.store)
        if name.startswith("agent"):
            return (*sched, "--store", self.store)
        if name.startswith("env"):
            return (*sched, "--sandbox-dir", str(self.sandbox_dir(name)), "--capacity", "64")
        rate = str(self.config.success_rate)
        return (*sched, "--time-scale", str(self.config.time_scale), "--success-rate", rate)

    def start(self, name: str, timeout_s: float = 60.0) -> ServiceProcess:
        n = self.starts[name] = self.starts.get(name, 0) + 1
        kind = name.rstrip("0123456789")
        log = self.workdir / f"{name}.{n}.log"
        proc = ServiceProcess(kind, *self._argv(name), log_path=log)
        self.procs[name] = proc
        proc.start(timeout_s=timeout_s)
        self.pgids.append(proc.pid)
        if kind == "env":
            self.env_pids.append(proc.pid)
        return proc

    def crash(self, name: str) -> None:
        """kill -9 of the service process alone (its sandboxes are orphaned, not stopped)."""
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.proc is not None
        proc.proc.wait(10)
        proc.kill()  # reap the rest of its group and close its pipe

    def env_processes(self) -> tuple[dict[str, Path], dict[str, int]]:
        """The env services' sandbox folders and pids, by name."""
        names = [n for n in self.procs if n.startswith("env")]
        return {n: self.sandbox_dir(n) for n in names}, {n: self.procs[n].pid for n in names}

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def _detection(workdir: Path, address: str, killed_wall: float) -> dict[str, float]:
    """From the services' logs: when the dead service was first noticed (a call to it
    failed: `unreachable`) and when the scheduler dropped it (`lost: no heartbeat`),
    in seconds after the kill. A sandbox fault (``address``: the sandbox id) is
    detected when an env service says that sandbox failed, died or failed its probe."""
    found: dict[str, float] = {}
    markers = (("detected_s", "unreachable"), ("lost_s", " lost: "))
    if address.startswith("sb-"):
        markers = (("detected_s", "failed"), ("detected_s", "died"))
    for log in sorted(workdir.glob("*.log")):
        for stamp, line in _STAMP.findall(log.read_text(errors="replace")):
            if address not in line or (at := _log_time(stamp)) < killed_wall - 0.5:
                continue
            for key, marker in markers:
                if marker in line and (key not in found or at - killed_wall < found[key]):
                    found[key] = round(at - killed_wall, 2)
    if "lost_s" in found:
        found["detected_s"] = min(found["lost_s"], found.get("detected_s", found["lost_s"]))
    return found


def _registered(address: str) -> set[str] | None:
    """The addresses of the services the scheduler places on; None if it does not answer."""
    import asyncio

    from megaflow.rpc.clients import SchedulerServiceClient
    from megaflow.v1 import scheduler_pb2

    async def ask() -> set[str]:
        client = SchedulerServiceClient(address, timeout_s=5.0)
        try:
            status = await client.status(scheduler_pb2.StatusRequest())
            return {svc.address for svc in status.services}
        finally:
            await client.close()

    try:
        return asyncio.run(ask())
    except Exception:
        return None


def _status_counters(address: str) -> dict[str, int]:
    """The scheduler's failure counters (since it started); {} when it does not answer."""
    import asyncio

    from megaflow.rpc.clients import SchedulerServiceClient
    from megaflow.v1 import scheduler_pb2

    async def ask() -> dict[str, int]:
        client = SchedulerServiceClient(address, timeout_s=5.0)
        try:
            status = await client.status(scheduler_pb2.StatusRequest())
            return dict(status.counters)
        finally:
            await client.close()

    try:
        return asyncio.run(ask())
    except Exception:  # a dying or restarting scheduler: a figure, not a check
        return {}


def _inject(
    kind: str, dep: Deployment, rng: random.Random, give_up: Callable[[], bool]
) -> dict[str, Any]:
    dirs, pids = dep.env_processes()
    if kind == "sandbox":
        return kill_sandbox(rng, dirs, pids, give_up)
    return hang_sandbox(rng, dirs, pids, give_up)


def _client(dep: Deployment, out: Path, log: Path) -> subprocess.Popen[str]:
    config = dep.config
    return start_run(
        log,
        "--scheduler", dep.address,
        "--tasks", str(config.tasks),
        "--concurrency", str(config.concurrency),
        "--success-rate", str(config.success_rate),
        "--step-timeout", str(config.step_timeout_s),
        "--out", str(out),
    )  # fmt: skip


def _undisturbed(workdir: Path, config: ChaosConfig, stop: threading.Event | None) -> int:
    """The same tasks, seed and policy in one embedded process with no fault: the
    outcomes the chaos run must reproduce. Returns its exit status."""
    run = start_run(
        workdir / "undisturbed.log",
        "--tasks", str(config.tasks),
        "--concurrency", str(config.concurrency),
        "--success-rate", str(config.success_rate),
        "--time-scale", str(config.time_scale),
        "--step-timeout", str(config.step_timeout_s),
        "--sandbox-dir", str(workdir / "sandboxes-undisturbed"),
        "--out", str(workdir / "undisturbed"),
    )  # fmt: skip
    try:
        return _wait(run, config.run_timeout_s, stop)
    finally:
        if run.poll() is None:
            kill_group(run)


def run_chaos(
    workdir: Path, config: ChaosConfig, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Run the deployment under the fault schedule; return the raw figures (see report).

    Setting ``stop`` (from another thread: a signal handler's) ends the run early: every
    process it started is stopped, then :class:`ChaosStopped` is raised.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        server: RedisServer | EtcdServer | None = None
        if config.store == "redis":
            server = stack.enter_context(RedisServer(workdir))
            url = server.url
        elif config.store == "etcd":
            server = stack.enter_context(EtcdServer(workdir))
            url = server.url
        else:
            url = str(workdir / "ledger.sqlite")
        figures = _run(workdir, config, url, stop, server)
        if config.compare_undisturbed:
            figures["undisturbed_exit"] = _undisturbed(workdir, config, stop)
            figures["sandbox_dirs"].append(str(workdir / "sandboxes-undisturbed"))
        rows = read_ledger(figures)  # while the store still runs
    figures["problems"] = check_all(figures, rows)  # once it has stopped too
    return figures


def _run(
    workdir: Path,
    config: ChaosConfig,
    store: str,
    stop: threading.Event | None,
    server: RedisServer | EtcdServer | None = None,
) -> dict[str, Any]:
    out = workdir / "out"
    dep = Deployment(workdir, config, store)
    view = LedgerView(store)
    rng = random.Random(config.seed + 1)
    events: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    run: subprocess.Popen[str] | None = None
    run_log = workdir / "run.log"
    started = time.monotonic()
    try:
        for name in ("scheduler", "model1", "model2", "env1", "env2", "agent1", "agent2"):
            _check(stop)
            dep.start(name)
        run = _client(dep, out, run_log)
        dep.pgids.append(run.pid)
        deadline = started + config.run_timeout_s
        # So that a service kill never lands before the last restart has taken work, it
        # waits for a floor of tasks finished since. A sandbox fault tests no restart:
        # it lands at its own point, also while a service kill waits for its floor
        # (behind one, slow restarts could push it past the end of the run).
        kills = schedule(config)
        faults = [k for k in kills if k.kind in SANDBOX_KINDS]
        # Every fault fires at a point of the run's progress, never at a time: a loaded
        # machine makes the run slower, not the faults rarer. A fault pushed back (by
        # the floor after a restart, or while it waits for a sandbox in use) fires at
        # the latest while a full round of tasks is still to finish (`last_call`), so
        # that it still lands while the run goes.
        last_call = max(1, config.tasks - config.concurrency)
        seen = {"at": 0.0, "finished": 0}

        def finished() -> int:  # the ledger, read at most every 0.1 s
            if time.monotonic() - seen["at"] > 0.1:
                seen.update(at=time.monotonic(), finished=view.finished())
            return int(seen["finished"])

        def too_late_for(point: int) -> Callable[[], bool]:
            """A sandbox fault waits for a sandbox in use (during a step of a task)
            until the run got this far past its point."""
            limit = min(point + max(config.min_gap, 2), last_call)
            return lambda: run.poll() is not None or finished() >= limit

        floor = 0

        def progress_to(target: int, what: Kill) -> None:
            while view.finished() < target and run.poll() is None:
                _check(stop)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"chaos run timed out before {what}")
                if what.kind not in SANDBOX_KINDS:
                    inject_due_faults()
                time.sleep(0.1)

        def landed(kill: Kill) -> dict[str, Any] | None:
            event: dict[str, Any] = {**kill.model_dump(), "finished": view.finished()}
            if run.poll() is not None:
                point = int(kill.at_fraction * config.tasks)
                why = f"the run had finished before its point ({point} results, floor {floor})"
                events.append({**event, "skipped": why})
                return None
            return event

        def inject(fault: Kill) -> None:
            if (event := landed(fault)) is None:
                return
            event["wall"] = time.time()
            point = int(fault.at_fraction * config.tasks)
            event.update(_inject(fault.kind, dep, rng, too_late_for(point)))
            if "sandbox" in event:
                event["address"] = event["sandbox"]
            events.append(event)

        def more_fault(kill: Kill) -> dict[str, Any]:
            if kill.kind == "store":
                if server is None:
                    return {"skipped": "the SQLite store has no server to kill"}
                down_at = time.monotonic()
                server.kill()
                server.restart(timeout_s=60.0)
                return {"wall": time.time(), "back_s": round(time.monotonic() - down_at, 2)}
            # an env host that hangs: stopped until the scheduler dropped it (it stops
            # heartbeating, its calls never answer), then continued
            proc = dep.procs[kill.name]
            address, stopped_at = proc.address, time.monotonic()
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                while (seen := _registered(dep.address)) is None or address in seen:
                    _check(stop)
                    if time.monotonic() > deadline or run.poll() is not None:
                        break
                    time.sleep(0.2)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            return {
                "address": address,
                "wall": time.time() - (time.monotonic() - stopped_at),
                "stopped_s": round(time.monotonic() - stopped_at, 2),
            }

        def inject_due_faults() -> None:
            while faults and view.finished() >= int(faults[0].at_fraction * config.tasks):
                inject(faults.pop(0))

        for kill in kills:
            if kill.kind in SANDBOX_KINDS:
                if kill in faults:  # not landed early, while a service kill waited
                    progress_to(int(kill.at_fraction * config.tasks), kill)
                    faults.remove(kill)
                    inject(kill)
                continue
            progress_to(min(max(int(kill.at_fraction * config.tasks), floor), last_call), kill)
            if (event := landed(kill)) is None:
                continue
            if kill.kind in MORE_KINDS:
                event.update(more_fault(kill))
                floor = view.finished() + config.min_gap
                events.append(event)
                continue
            address = dep.procs[kill.name].address
            if kill.kind == "scheduler":
                for key, value in _status_counters(dep.address).items():
                    counters[key] = counters.get(key, 0) + value
            event.update(address=address, wall=time.time())
            killed_at = time.monotonic()
            dep.crash(kill.name)
            dep.start(kill.name, timeout_s=120.0)
            event["back_s"] = round(time.monotonic() - killed_at, 2)
            floor = view.finished() + config.min_gap
            events.append(event)
        code = _wait(run, max(1.0, deadline - time.monotonic()), stop)
        for key, value in _status_counters(dep.address).items():
            counters[key] = counters.get(key, 0) + value
    finally:
        if run is not None and run.poll() is None:
            kill_group(run)  # (a run that ended alone keeps its group for the checks)
        dep.stop_all()
        view.close()
    wall_s = time.monotonic() - started
    for event in events:
        if "address" in event and event["kind"] != "scheduler":
            event.update(_detection(workdir, event["address"], event["wall"]))
    return {
        "workdir": str(workdir),
        "config": config.model_dump(),
        "store_url": store,
        "run_exit": code,
        "wall_s": round(wall_s, 1),
        "events": events,
        "counters": counters,
        "pgids": dep.pgids,
        "env_pids": dep.env_pids,
        "sandbox_dirs": [str(dep.sandbox_dir(n)) for n in ("env1", "env2")],
        "run_log_tail": run_log.read_text()[-1500:],
    }
