"""Checks and figures of a finished chaos run (see :mod:`megaflow.testing.chaos`).

`check_all` returns what went wrong ([] when nothing did): every task once in the
ledger, in a terminal state; results and trajectories hold each task exactly once; no
infrastructure failure carries a reward; every reward is the deterministic policy's,
and each task's outcome that of an undisturbed run of the same tasks and seed;
nothing (sandbox, cgroup, mount, process) is left. `report` and `format_report` give
the faults, their detection, retries and resumptions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil

from megaflow.testing.chaos_faults import LedgerView
from megaflow.testing.mounts import mounts_under
from megaflow.testing.processes import pids_mentioning
from megaflow.testing.simulated_model import SimulatedPolicy

SERVICE_KINDS = ("scheduler", "agent", "env", "model")
"""Service processes the driver kills -9 (and restarts)."""
SANDBOX_KINDS = ("sandbox", "hang")
"""Sandbox faults: bwrap killed from outside; the sandbox frozen from outside."""
KINDS = SERVICE_KINDS + SANDBOX_KINDS
MORE_KINDS = ("env_hang", "store")
"""The slower suite's faults: an env host stopped (SIGSTOP) until the scheduler drops
it, then continued (SIGCONT); the store's server (redis-server, etcd) killed -9 and
restarted on its data."""


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_ledger(rows: list[Any], tasks: int) -> list[str]:
    """Every submitted task is in the ledger once, in exactly one terminal state."""
    from megaflow.store.ledger import TERMINAL_STATES

    problems = []
    if len(rows) != tasks or len({r.task_id for r in rows}) != len(rows):
        problems.append(f"ledger has {len(rows)} rows for {tasks} submitted tasks")
    problems += [
        f"ledger: {r.task_id} not terminal (state {r.state})"
        for r in rows
        if r.state not in TERMINAL_STATES
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


def check_against_undisturbed(out: Path, undisturbed: Path) -> list[str]:
    """Every task ended as in an undisturbed run of the same tasks and seed: the same
    status and the same reward."""
    want = {r["task_id"]: r for r in _records(undisturbed / "results.jsonl")}
    problems = []
    for r in _records(out / "results.jsonl"):
        ref = want.get(r["task_id"])
        if ref is None:
            problems.append(f"{r['task_id']}: not in the undisturbed run")
        elif (r["status"], r.get("reward")) != (ref["status"], ref.get("reward")):
            problems.append(
                f"{r['task_id']}: {r['status']} reward {r.get('reward')} under chaos, "
                f"{ref['status']} reward {ref.get('reward')} undisturbed"
            )
    return problems


def _pids_naming(text: str) -> set[int]:
    """Processes (not this one or its callers) whose command line contains `text`."""
    mine = {p.pid for p in psutil.Process().parents()}
    return set(pids_mentioning(text)) - mine


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
    if left_mounts := mounts_under(figures["workdir"]):
        problems.append(f"mounts left: {left_mounts[:3]}")
    return problems


def read_ledger(figures: dict[str, Any]) -> list[Any]:
    """Every task row of the run's ledger (its store must still run)."""
    view = LedgerView(figures["store_url"])
    try:
        return view.rows()
    finally:
        view.close()


def check_all(figures: dict[str, Any], ledger_rows: list[Any]) -> list[str]:
    """Every check of a finished chaos run; [] when all pass. ``ledger_rows``: from
    :func:`read_ledger`, read before the driver stopped its store server (which would
    otherwise count as a process left behind)."""
    from megaflow.testing.chaos import ChaosConfig

    config = ChaosConfig.model_validate(figures["config"])
    workdir = Path(figures["workdir"])
    problems = [] if figures["run_exit"] == 0 else [f"run exited {figures['run_exit']}"]
    problems += check_ledger(ledger_rows, config.tasks)
    problems += check_outputs(workdir / "out", config.tasks, config.success_rate)
    if figures.get("undisturbed_exit") is not None:
        if figures["undisturbed_exit"] != 0:
            problems.append(f"the undisturbed run exited {figures['undisturbed_exit']}")
        problems += check_against_undisturbed(workdir / "out", workdir / "undisturbed")
    return problems + check_nothing_left(figures)


def report(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run: tasks, faults by kind, detection, retries, resumptions."""
    out = Path(figures["workdir"]) / "out"
    results = _records(out / "results.jsonl")
    trajectories = _records(out / "trajectories.jsonl")
    done = [e for e in figures["events"] if "skipped" not in e]
    watched = [e for e in done if e["kind"] != "scheduler"]
    return {
        "tasks": len(results),
        "succeeded": sum(r["status"] == "succeeded" for r in results),
        "failed": sum(r["status"] != "succeeded" for r in results),
        "failed_infra": sum(r["error_kind"] == "infra" for r in results),
        "faults": {
            k: sum(e["kind"] == k for e in done)
            for k in KINDS + MORE_KINDS
            if k in KINDS or any(e["kind"] == k for e in figures["events"])
        },
        "faults_skipped": len(figures["events"]) - len(done),
        "detected_s": {
            k: [e["detected_s"] for e in done if e["kind"] == k and "detected_s" in e]
            for k in KINDS + MORE_KINDS
            if k not in ("scheduler", "store")
        },
        "lost_s": [e["lost_s"] for e in done if "lost_s" in e],
        "undetected": {
            k: sum(e["kind"] == k and "detected_s" not in e for e in watched)
            for k in KINDS + MORE_KINDS
            if k not in ("scheduler", "store")
        },
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
        f"{'fault':<10} {'target':<22} {'at':>5} {'finished':>8} {'back_s':>7} {'detect_s':>8} "
        f"{'lost_s':>7}"
    ]
    for e in figures["events"]:
        target = e.get("sandbox", e["name"])[-22:]
        rows.append(
            f"{e['kind']:<10} {target:<22} {e['at_fraction']:>5.2f} {e['finished']:>8} "
            f"{e.get('back_s', '-'):>7} {e.get('detected_s', e.get('skipped', '-'))!s:>8} "
            f"{e.get('lost_s', '-')!s:>7}"
        )
    rows += [f"{key:<18} {value}" for key, value in report(figures).items()]
    return "\n".join(rows)
