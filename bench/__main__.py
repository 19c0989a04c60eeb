"""Run the benchmarks and print their figures: `python -m bench [--quick] [NAME ...]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from bench import (
    baseline_bench,
    chaos_bench,
    docker_bench,
    e2e_bench,
    env_bench,
    gateway_bench,
    model_bench,
    packing_bench,
    scale_bench,
    store_bench,
)

BENCHES = {
    "env": env_bench.run,
    "docker": docker_bench.run,
    "model": model_bench.run,
    "gateway": gateway_bench.run,
    "e2e": e2e_bench.run,
    "scale": scale_bench.run,
    "packing": packing_bench.run,
    "baseline": baseline_bench.run,
    "store": store_bench.run,
    "chaos": chaos_bench.run,
}


def main() -> None:
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
    figures = {}
    for name in args.names or list(BENCHES):
        figures[name] = asyncio.run(BENCHES[name](quick=args.quick))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
