"""A chaos driver: a live multi-process deployment, a seeded schedule of kill -9s, checks.

`run_chaos` starts a scheduler (sqlite store, fixed address), two agent services
(checkpointing to the store), two env services (real local sandboxes), two simulated
model services and `megaflow run --scheduler` as a client; while the run goes it kills
(SIGKILL of the service process) the scheduler, an agent, an env and a model replica at
seeded points of the run's progress and restarts each (the scheduler on its address and
store; the others on new ports, re-registering; an env on its sandbox folder, so that
it reclaims the orphans). `check_all` then checks exactly-once results, true rewards and
that nothing is left behind; `format_report` prints the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from megaflow.model.simulated import SimulatedPolicy
from megaflow.testing.processes import ServiceProcess
from megaflow.testing.server import free_port

KINDS = ("scheduler", "agent", "env", "model")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (.*)$", re.M)


class ChaosConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: int = Field(60, ge=1, description="Tasks submitted by the client.")
    concurrency: int = Field(16, ge=1, description="The client's cap on tasks in flight.")
    seed: int = Field(0, description="Seed of the fault schedule (the policy's seed is 0).")
    success_rate: float = Field(0.8, ge=0.0, le=1.0, description="Simulated policy's rate.")
    time_scale: float = Field(1.0, ge=0.0, description="Simulated model latency scale.")
    kills_per_kind: int = Field(1, ge=0, description="kill -9s of each kind of service.")
    window: tuple[float, float] = Field(
        (0.1, 0.75), description="Kills happen at these fractions of tasks finished."
    )
    min_gap: int = Field(
        3, ge=0, description="Tasks finished between one restart and the next kill, at least."
    )
    run_timeout_s: float = Field(600.0, gt=0, description="Bound on the whole run.")


class Kill(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(description="scheduler, agent, env or model.")
    name: str = Field(description="Which process (e.g. agent1).")
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
        for kind in KINDS
        for _ in range(config.kills_per_kind)
    ]
    return sorted(kills, key=lambda k: k.at_fraction)


def _finished(store: str) -> int:
    """Tasks in a terminal state in the ledger: the run's progress, whether or not the
    client's watch is connected (after a scheduler restart it catches up in a burst)."""
    from megaflow.store.ledger import TERMINAL_STATES

    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
        try:
            marks = ",".join("?" * len(TERMINAL_STATES))
            sql = f"SELECT COUNT(*) FROM tasks WHERE state IN ({marks})"
            return int(db.execute(sql, TERMINAL_STATES).fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:  # not created yet, or busy: no progress seen this time
        return 0


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Deployment:
    """The service processes of one chaos run, by name; restarts keep their settings."""

    def __init__(self, workdir: Path, config: ChaosConfig) -> None:
        self.workdir = workdir
        self.config = config
        self.store = str(workdir / "ledger.sqlite")
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, ServiceProcess] = {}
        self.pgids: list[int] = []
        self.env_pids: list[int] = []
        self.starts: dict[str, int] = {}

    def sandbox_dir(self, name: str) -> Path:
        return self.workdir / f"sandboxes-{name}"

    def _argv(self, name: str) -> tuple[str, ...]:
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

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def _detection(workdir: Path, address: str, killed_wall: float) -> dict[str, float]:
    """From the services' logs: when the dead service was first noticed (a call to it
    failed: `unreachable`) and when the scheduler dropped it (`lost: no heartbeat`),
    in seconds after the kill."""
    found: dict[str, float] = {}
    for log in sorted(workdir.glob("*.log")):
        for stamp, line in _STAMP.findall(log.read_text(errors="replace")):
            if address not in line or (at := _log_time(stamp)) < killed_wall - 0.5:
                continue
            for key, marker in (("detected_s", "unreachable"), ("lost_s", " lost: ")):
                if marker in line and (key not in found or at - killed_wall < found[key]):
                    found[key] = round(at - killed_wall, 2)
    if "lost_s" in found:
        found["detected_s"] = min(found["lost_s"], found.get("detected_s", found["lost_s"]))
    return found


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


def run_chaos(workdir: Path, config: ChaosConfig) -> dict[str, Any]:
    """Run the deployment under the fault schedule; return the raw figures (see report)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "out"
    dep = Deployment(workdir, config)
    events: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    run: subprocess.Popen[str] | None = None
    run_log = workdir / "run.log"
    started = time.monotonic()
    try:
        dep.start("scheduler")
        for name in ("model1", "model2", "env1", "env2", "agent1", "agent2"):
            dep.start(name)
        with run_log.open("w") as sink:
            run = subprocess.Popen(
                [
                    sys.executable, "-m", "megaflow.cli.main", "run",
                    "--scheduler", dep.address,
                    "--tasks", str(config.tasks),
                    "--concurrency", str(config.concurrency),
                    "--success-rate", str(config.success_rate),
                    "--out", str(out),
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )  # fmt: skip
        dep.pgids.append(run.pid)
        deadline = started + config.run_timeout_s
        floor = 0  # so that a kill never lands before the last restart has taken work
        for kill in schedule(config):
            target = max(int(kill.at_fraction * config.tasks), floor)
            while _finished(dep.store) < target and run.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"chaos run timed out before {kill}")
                time.sleep(0.05)
            event: dict[str, Any] = {**kill.model_dump(), "finished": _finished(dep.store)}
            if run.poll() is not None:
                events.append({**event, "skipped": "the run had finished"})
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
            floor = _finished(dep.store) + config.min_gap
            events.append(event)
        remaining = max(1.0, deadline - time.monotonic())
        try:
            code = run.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            raise TimeoutError("chaos run did not finish in time") from None
        for key, value in _status_counters(dep.address).items():
            counters[key] = counters.get(key, 0) + value
    finally:
        if run is not None and run.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        dep.stop_all()
    wall_s = time.monotonic() - started
    for event in events:
        if "address" in event and event["kind"] != "scheduler":
            event.update(_detection(workdir, event["address"], event["wall"]))
    return {
        "workdir": str(workdir),
        "config": config.model_dump(),
        "run_exit": code,
        "wall_s": round(wall_s, 1),
        "events": events,
        "counters": counters,
        "pgids": dep.pgids,
        "env_pids": dep.env_pids,
        "sandbox_dirs": [str(dep.sandbox_dir(n)) for n in ("env1", "env2")],
        "run_log_tail": run_log.read_text()[-1500:],
    }


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_ledger(store: Path, tasks: int) -> list[str]:
    """Every submitted task is in the ledger once, in exactly one terminal state."""
    from megaflow.store.ledger import TERMINAL_STATES

    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT task_id, state FROM tasks").fetchall()
    finally:
        db.close()
    problems = []
    if len(rows) != tasks:
        problems.append(f"ledger has {len(rows)} tasks, {tasks} submitted")
    problems += [
        f"ledger: {t} not terminal (state {s})" for t, s in rows if s not in TERMINAL_STATES
    ]
    return problems


def check_outputs(out: Path, tasks: int, success_rate: float) -> list[str]:
    """results.jsonl and trajectories.jsonl hold each task exactly once; no infrastructure
    error carries a reward; every reward is the deterministic simulated policy's."""
    problems = []
    results = _records(out / "results.jsonl")
    ids = [r["task_id"] for r in results]
    trajectories = [t["task_id"] for t in _records(out / "trajectories.jsonl")]
    for what, got in (("results", ids), ("trajectories", trajectories)):
        if len(got) != len(set(got)):
            problems.append(f"{what}: {len(got) - len(set(got))} duplicated")
        if len(set(got)) != tasks:
            problems.append(f"{what}: {tasks - len(set(got))} lost of {tasks}")
    if sorted(trajectories) != sorted(ids):
        problems.append("trajectories and results name different tasks")
    policy = SimulatedPolicy(success_rate=success_rate, seed=0)
    for r in results:
        if r["error_kind"] == "infra" and r.get("reward") is not None:
            problems.append(f"infrastructure failure with a reward: {r}")
        elif r.get("reward") is not None:
            want = 1.0 if policy.solves(r["task_id"]) else 0.0
            if r["reward"] != want:
                problems.append(f"reward {r['reward']} != policy's {want}: {r}")
    return problems


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            continue
        break
    return pids


def _pids_naming(text: str) -> set[int]:
    """Processes (not this one or its callers) whose command line contains `text`."""
    pids, mine = set(), _ancestors()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in mine:
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(entry.name))
    return pids


def check_nothing_left(figures: dict[str, Any]) -> list[str]:
    """After everything stopped: no sandbox folder, no process of the run's groups, no
    process naming the work folder, no sandbox cgroup of its env services, no mount."""
    problems = []
    for root in map(Path, figures["sandbox_dirs"]):
        left = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if left:
            problems.append(f"{len(left)} sandbox(es) left in {root}: {left[:5]}")
    for pgid in figures["pgids"]:
        try:
            os.killpg(pgid, 0)
            problems.append(f"process group {pgid} still has processes")
        except ProcessLookupError:
            pass
    if pids := _pids_naming(figures["workdir"]):
        problems.append(f"processes left naming the work folder: {sorted(pids)}")
    prefixes = tuple(f"megaflow-sb-{pid}-" for pid in figures["env_pids"])
    cgroups = [
        str(d)
        for d in Path("/sys/fs/cgroup").glob("**/megaflow-sb-*")
        if d.name.startswith(prefixes)
    ]
    if cgroups:
        problems.append(f"sandbox cgroups left: {cgroups[:3]}")
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    if left_mounts := [m for m in mounts if figures["workdir"] in m]:
        problems.append(f"mounts left: {left_mounts[:3]}")
    return problems


def check_all(figures: dict[str, Any]) -> list[str]:
    """Every check of a finished chaos run; [] when all pass."""
    config = ChaosConfig.model_validate(figures["config"])
    workdir = Path(figures["workdir"])
    problems = [] if figures["run_exit"] == 0 else [f"run exited {figures['run_exit']}"]
    problems += check_ledger(workdir / "ledger.sqlite", config.tasks)
    problems += check_outputs(workdir / "out", config.tasks, config.success_rate)
    return problems + check_nothing_left(figures)


def report(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run: tasks, kills by kind, detection, retries, resumptions."""
    out = Path(figures["workdir"]) / "out"
    results = _records(out / "results.jsonl")
    trajectories = _records(out / "trajectories.jsonl")
    done = [e for e in figures["events"] if "skipped" not in e]
    detected = [e["detected_s"] for e in done if "detected_s" in e]
    return {
        "tasks": len(results),
        "succeeded": sum(r["status"] == "succeeded" for r in results),
        "failed": sum(r["status"] != "succeeded" for r in results),
        "failed_infra": sum(r["error_kind"] == "infra" for r in results),
        "kills": {k: sum(e["kind"] == k for e in done) for k in KINDS},
        "kills_skipped": len(figures["events"]) - len(done),
        "detected_s": detected,
        "lost_s": [e["lost_s"] for e in done if "lost_s" in e],
        "undetected_kills": sum(e["kind"] != "scheduler" and "detected_s" not in e for e in done),
        "scheduler_back_s": [e["back_s"] for e in done if e["kind"] == "scheduler"],
        "retried_tasks": sum(r["attempts"] >= 2 for r in results),
        "extra_attempts": sum(max(0, r["attempts"] - 1) for r in results),
        "max_attempts": max((r["attempts"] for r in results), default=0),
        "resumptions": sum(len(t.get("resumptions", [])) for t in trajectories),
        "resumed_tasks": sum(bool(t.get("resumptions")) for t in trajectories),
        "counters": figures["counters"],
        "wall_s": figures["wall_s"],
    }


def format_report(figures: dict[str, Any]) -> str:
    rows = [
        f"{'kill':<10} {'name':<8} {'at':>5} {'finished':>8} {'back_s':>7} {'detect_s':>8} "
        f"{'lost_s':>7}"
    ]
    for e in figures["events"]:
        rows.append(
            f"{e['kind']:<10} {e['name']:<8} {e['at_fraction']:>5.2f} {e['finished']:>8} "
            f"{e.get('back_s', '-'):>7} {e.get('detected_s', e.get('skipped', '-'))!s:>8} "
            f"{e.get('lost_s', '-')!s:>7}"
        )
    rows += [f"{key:<18} {value}" for key, value in report(figures).items()]
    return "\n".join(rows)
