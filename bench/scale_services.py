"""The scale benchmark's simulated services as processes, for the multi-process mode.

    python -m bench.scale_services serve model --scheduler ADDR --turn-s 12 --slots N
    python -m bench.scale_services serve env --scheduler ADDR --step-s 3 --capacity N

A Model Service over a simulated backend whose GPU latency model has a fixed time per
turn and enough slots that nothing queues, and a `SimulatedEnvironmentService` with a
fixed step latency: the same parts as the embedded level of `bench.scale_bench`,
served over gRPC and registered with the scheduler like `megaflow serve`. Benchmark
fakes, named as such; not part of the product's CLI.
"""

from __future__ import annotations

import argparse
import asyncio

from megaflow.core.allocator import preload

# The services' modules are imported inside the functions, after `preload()` (which
# re-executes the process): imported before it, they would be imported twice.


async def _model(args: argparse.Namespace) -> None:
    from megaflow.deploy.processes import serve
    from megaflow.model.latency import GpuLatencyModel, LatencyConfig
    from megaflow.model.service import ModelServiceConfig, ModelServiceImpl
    from megaflow.testing.simulated_model import SimulatedBackend

    latency = GpuLatencyModel(LatencyConfig(slots=args.slots, overhead_s=args.turn_s))
    backend = SimulatedBackend(success_rate=0.8, latency=latency)
    service = ModelServiceImpl([backend], config=ModelServiceConfig(replica_capacity=args.slots))
    await serve("model", service, listen=args.listen, scheduler=args.scheduler, capacity=args.slots)


async def _env(args: argparse.Namespace) -> None:
    from megaflow.deploy.processes import serve
    from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService

    env = SimulatedEnvironmentService(
        SimulatedEnvConfig(
            step_latency_s=args.step_s,
            scoring_latency_s=args.step_s,
            max_environments=args.capacity,
        )
    )
    await serve("env", env, listen=args.listen, scheduler=args.scheduler, capacity=args.capacity)


def main() -> None:
    preload()  # like `megaflow serve`: the same allocator as MegaFlow's own services
    parser = argparse.ArgumentParser(prog="python -m bench.scale_services")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve")
    kinds = serve_parser.add_subparsers(dest="kind", required=True)
    for kind in ("model", "env"):
        p = kinds.add_parser(kind)
        p.add_argument("--scheduler", required=True)
        p.add_argument("--listen", default="127.0.0.1:0")
    kinds.choices["model"].add_argument("--turn-s", type=float, required=True)
    kinds.choices["model"].add_argument("--slots", type=int, required=True)
    kinds.choices["env"].add_argument("--step-s", type=float, required=True)
    kinds.choices["env"].add_argument("--capacity", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_model(args) if args.kind == "model" else _env(args))


if __name__ == "__main__":
    main()
