"""The restart stampede: N services re-registering with a scheduler that restarts.

N registrants run MegaFlow's own heartbeat loop (`megaflow.deploy.processes.
_register_forever`, real gRPC over loopback, one channel each) against a stand-in
scheduler in another process that only records when each RegisterService call arrives
(wall clock, one line per call). Once every registrant is registered and heartbeating,
the scheduler is killed (SIGKILL), stays down `--down` seconds, and comes back on the
same address; the figures are the calls that arrive after it is back: the peak number
in any 100 ms window (the stampede), and how long until every registrant was back.
The same run does it twice, jitter off (`megaflow.core.jitter.set_enabled(False)`: the
loops as they were, in lockstep) and jitter on.

    python -m bench.stampede_bench [--quick] [--registrants N] [--down S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import print_table
from megaflow.core import jitter
from megaflow.deploy.processes import _register_forever
from megaflow.testing.server import free_port
from megaflow.v1 import scheduler_pb2

WINDOW_S = 0.1
HEARTBEAT_S = 2.0
AFTER_S = 6.0  # calls counted this long after the restart


class _Recorder:
    """The stand-in scheduler: RegisterService records its arrival, nothing else."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("a", buffering=1)

    async def register_service(
        self, request: scheduler_pb2.RegisterServiceRequest
    ) -> scheduler_pb2.RegisterServiceResponse:
        self._log.write(f"{time.time():.6f} {request.address}\n")
        return scheduler_pb2.RegisterServiceResponse(heartbeat_interval_s=HEARTBEAT_S)

    def __getattr__(self, name: str) -> Any:
        async def unsupported(request: object) -> object:
            raise NotImplementedError(name)

        return unsupported


async def _serve(address: str, log: Path) -> None:
    from megaflow.rpc.server import GrpcServer

    server = GrpcServer(address, {"scheduler": _Recorder(log)})
    await server.start()
    print("ready", flush=True)
    await server.wait()


def _start_scheduler(address: str, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.stampede_bench", "--serve", address, str(log)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the stand-in scheduler did not start")
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _arrivals(log: Path) -> list[tuple[float, str]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        stamp, address = line.split()
        out.append((float(stamp), address))
    return out


async def _arm(registrants: int, down_s: float, jittered: bool, workdir: Path) -> dict[str, Any]:
    jitter.set_enabled(jittered)
    address = f"127.0.0.1:{free_port()}"
    log = _folder(workdir) / f"arrivals-{'on' if jittered else 'off'}.log"
    proc = await asyncio.to_thread(_start_scheduler, address, log)
    loops: list[asyncio.Task[None]] = []
    try:
        for i in range(registrants):
            registered = asyncio.Event()
            loops.append(
                asyncio.create_task(
                    _register_forever(address, "env", f"10.0.{i // 250}.{i % 250}:1", 8, registered)
                )
            )
        await asyncio.sleep(2 * HEARTBEAT_S)  # all registered, heartbeating
        # (in a thread: the registrants' loop must not stall while a process starts)
        await asyncio.to_thread(_kill, proc)
        killed = time.time()
        await asyncio.sleep(down_s)
        proc = await asyncio.to_thread(_start_scheduler, address, log)
        back = time.time()
        await asyncio.sleep(AFTER_S)
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        _kill(proc)
    calls = _arrivals(log)
    before = {a for t, a in calls if t < killed}
    after = sorted((t, a) for t, a in calls if t >= back)
    windows: dict[int, int] = {}
    for t, _ in after:
        key = int((t - back) / WINDOW_S)
        windows[key] = windows.get(key, 0) + 1
    first: dict[str, float] = {}
    for t, a in after:
        first.setdefault(a, t - back)
    return {
        "jitter": "on" if jittered else "off",
        "registered_before": len(before),
        "back": len(first),
        "peak_per_100ms": max(windows.values(), default=0),
        "all_back_s": round(max(first.values()), 2) if len(first) == registrants else None,
        "calls_after": len(after),
    }


async def run(
    quick: bool = False, registrants: int = 200, down_s: float = 5.0, repeats: int = 3
) -> dict[str, Any]:
    if quick:
        registrants, down_s, repeats = min(registrants, 50), min(down_s, 3.0), 1
    was = jitter.enabled()
    # each registrant warns once per outage; 2 x N warnings say nothing here
    logging.getLogger("megaflow.deploy.processes").setLevel(logging.ERROR)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="megaflow-stampede-") as tmp:
            for n in range(repeats):  # the arms alternate: drift of the machine hits both
                for jittered in (False, True):
                    row = await _arm(registrants, down_s, jittered, Path(tmp) / f"{n}")
                    rows.append({"restart": n + 1, **row})
    finally:
        jitter.set_enabled(was)
    keys = ("jitter", "restart", "registered_before", "back", "peak_per_100ms", "all_back_s")
    keys += ("calls_after",)
    print_table(
        f"restart stampede: {registrants} registrants (heartbeat {HEARTBEAT_S:g} s), "
        f"scheduler down {down_s:g} s, calls in the {AFTER_S:g} s after it is back",
        [tuple(str(r[k]) for k in keys) for r in rows],
        ("jitter", "restart", "registered before", "back", "peak / 100 ms", "all back (s)",
         "calls"),
    )  # fmt: skip
    peaks = {
        arm: sorted(r["peak_per_100ms"] for r in rows if r["jitter"] == arm)
        for arm in ("off", "on")
    }
    summary = {arm: {"median": p[len(p) // 2], "max": p[-1]} for arm, p in peaks.items()}
    print(f"peak re-registrations per 100 ms (median, max over {repeats}): {summary}")
    return {"registrants": registrants, "down_s": down_s, "arms": rows, "peaks": summary}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stampede_bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--registrants", type=int, default=200)
    parser.add_argument("--down", type=float, default=5.0, help="seconds the scheduler is down")
    parser.add_argument("--repeats", type=int, default=3, help="restarts per arm")
    parser.add_argument("--serve", nargs=2, metavar=("ADDRESS", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve[0], Path(args.serve[1])))
        return
    asyncio.run(run(args.quick, args.registrants, args.down, args.repeats))


if __name__ == "__main__":
    main()
