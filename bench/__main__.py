"""Run the benchmarks and print their figures: `python -m bench [--quick] [NAME ...]`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from megaflow.core.allocator import current, preload

# name -> module of bench/ whose `run(quick=...)` coroutine prints and returns figures
BENCHES = {
    "env": "env_bench",
    "local-quota": "local_quota_bench",
    "docker": "docker_bench",
    "docker-hardening": "docker_hardening_bench",
    "model": "model_bench",
    "gateway": "gateway_bench",
    "e2e": "e2e_bench",
    "scale": "scale_bench",
    "packing": "packing_bench",
    "baseline": "baseline_bench",
    "store": "store_bench",
    "chaos": "chaos_bench",
    "repo": "repo_bench",
    "mini-swe-agent": "mini_swe_agent_bench",
    "stampede": "stampede_bench",
    "checkpoint": "checkpoint_bench",
}


async def _stoppable(bench: Coroutine[Any, Any, Any]) -> Any:
    """Run ``bench``; SIGTERM cancels it as Ctrl-C does, so that it stops what it
    started (services, sandboxes, servers) before the process goes."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await bench


def main() -> None:
    preload()  # the allocator MegaFlow's own processes run on (may re-execute this one)
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "names", nargs="*", help=f"which benchmarks: {sorted(BENCHES)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
    logging.basicConfig(level=logging.WARNING)
    print(f"allocator: {current()}", flush=True)
    figures = {}
    for name in args.names or list(BENCHES):
        module = importlib.import_module(f"bench.{BENCHES[name]}")
        try:
            figures[name] = asyncio.run(_stoppable(module.run(quick=args.quick)))
        except asyncio.CancelledError:
            sys.exit(128 + signal.SIGTERM)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
