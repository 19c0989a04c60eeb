"""A lone environment host (the shape a small team runs) killed twice mid-run and
restarted in place, on its address: every task still ends with its true, scored result
(none quarantined as an infrastructure failure, none out of attempts), `megaflow run`
exits 0, and the scheduler never dispatched to the host while it was dead nor the moment
it came back (every attempt that lost contact with it was one already running there
when it was killed)."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from megaflow.testing.chaos import ChaosConfig, Deployment, _client
from megaflow.testing.chaos_faults import LedgerView
from megaflow.testing.processes import kill_group
from megaflow.testing.simulated_model import SimulatedPolicy

pytestmark = pytest.mark.integration

TASKS = 60
DOWN_S = 8.0  # each death: the host is away this long, then restarts on its address
KILL_AT = (12, 36)  # ...after this many results
_UNREACHABLE = re.compile(r"^(\S+ \S+) INFO .*attempt (\S+) failed: (\S+) unreachable", re.M)


def _at(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.timeout(300)
def test_a_lone_env_host_killed_twice_costs_no_task_its_result(tmp_path: Path) -> None:
    config = ChaosConfig(tasks=TASKS, concurrency=10, success_rate=0.8, compare_undisturbed=False)
    store = str(tmp_path / "ledger.sqlite")
    dep = Deployment(tmp_path, config, store, same_address=("env1",))
    view = LedgerView(store)
    run = None
    deaths: list[tuple[float, float]] = []  # (killed, back) wall clock
    try:
        for name in ("scheduler", "model1", "env1", "agent1"):
            dep.start(name)
        env = dep.procs["env1"].address
        run = _client(dep, tmp_path / "out", tmp_path / "run.log")
        for target in KILL_AT:
            deadline = time.monotonic() + 150
            while view.finished() < target and run.poll() is None:
                assert time.monotonic() < deadline, "the run stalled"
                time.sleep(0.05)
            assert run.poll() is None, "the run ended before the kill"
            killed = time.time()
            dep.crash("env1")
            time.sleep(DOWN_S)
            dep.start("env1")
            assert dep.procs["env1"].address == env
            deaths.append((killed, time.time()))
        code = run.wait(200)
    finally:
        if run is not None and run.poll() is None:
            kill_group(run)
        dep.stop_all()
        view.close()
    tail = (tmp_path / "run.log").read_text()[-2000:]
    assert code == 0, tail

    records = [
        json.loads(line) for line in (tmp_path / "out/results.jsonl").read_text().splitlines()
    ]
    assert sorted(r["task_id"] for r in records) == sorted({r["task_id"] for r in records})
    assert len(records) == TASKS
    policy = SimulatedPolicy(success_rate=0.8, seed=0)
    for r in records:  # scored, with its true reward: no quarantine, no exhausted attempts
        assert r["status"] == "succeeded", r
        assert r["reward"] == (1.0 if policy.solves(r["task_id"]) else 0.0), r

    # Each attempt that found the host unreachable was running there when it was
    # killed: no task lost two attempts to one death (a second would have been
    # dispatched to the dead address while it was down, or the moment it came back,
    # before the agent's channel could reconnect: both used to happen).
    log = "".join(p.read_text() for p in sorted(tmp_path.glob("scheduler.*.log")))
    lost = [(_at(stamp), attempt) for stamp, attempt, address in _UNREACHABLE.findall(log)
            if address == env]  # fmt: skip
    assert lost, log[-3000:]  # the kills did hit running attempts
    starts = [killed - 0.5 for killed, _ in deaths]
    per_death: dict[tuple[int, str], list[str]] = {}
    for at, attempt in lost:
        death = sum(at >= start for start in starts) - 1
        assert death >= 0, (attempt, at, deaths)  # none before the first kill
        per_death.setdefault((death, attempt.split("#")[0]), []).append(attempt)
    twice = {key: attempts for key, attempts in per_death.items() if len(attempts) > 1}
    assert twice == {}, (twice, deaths)
    assert all(r["attempts"] <= 1 + len(deaths) for r in records), records
    retried = sum(r["attempts"] > 1 for r in records)
    print(f"\n{len(lost)} attempts lost to 2 deaths of the lone env host, "
          f"{retried} tasks retried, all {TASKS} scored")  # fmt: skip
