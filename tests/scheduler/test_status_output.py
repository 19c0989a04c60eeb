"""`megaflow status` prints the queue depth, waits, pools and host resources; services
advertise their resources when they register."""

from __future__ import annotations

from rich.console import Console

from megaflow.cli.output import print_status
from megaflow.deploy.processes import advertised_resources
from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.v1 import scheduler_pb2


def test_status_prints_queue_depth_waits_pools_and_resources() -> None:
    status = scheduler_pb2.StatusResponse(
        pending=7,
        queued=6,
        running=3,
        oldest_wait_s=12.5,
        wait_p50_s=0.25,
        wait_p99_s=4.5,
        runs=[scheduler_pb2.QueueDepth(key="run-abc", queued=6, in_flight=3)],
        users=[scheduler_pb2.QueueDepth(key="alice", queued=5, in_flight=2)],
        pools=[scheduler_pb2.PoolStatus(name="pool:gpu", in_flight=2, limit=2)],
        services=[
            scheduler_pb2.ServiceStatus(
                kind=scheduler_pb2.SERVICE_KIND_ENV,
                address="node1:7001",
                capacity=8,
                in_flight=3,
                resources=scheduler_pb2.HostResources(
                    cpu_millis=4000, gpus=2, accelerator="h100", warm_images={"py": 2}
                ),
                cpu_millis_used=1500,
                gpus_used=1,
                warm_placements=9,
            )
        ],
    )
    console = Console(record=True, width=200)
    print_status(console, status)
    text = console.export_text()
    for expected in (
        "queue per run",
        "run-abc",
        "queue per user",
        "alice",
        "12.5 s",
        "4.50 s",
        "pool:gpu",
        "1.5/4",
        "1/2 h100",
        "node1:7001",
    ):
        assert expected in text, expected


def test_services_advertise_their_machine_and_warm_pools() -> None:
    env = SimulatedEnvironmentService(SimulatedEnvConfig(warm_pool={"py": 3}))
    offer = advertised_resources(env)
    assert offer.cpu_millis >= 1000 and offer.memory_mib > 0
    assert dict(offer.warm_images) == {"py": 3}
    assert advertised_resources(object()).warm_images == {}


def test_status_prints_failure_counters_from_the_scheduler() -> None:
    status = scheduler_pb2.StatusResponse(
        counters={"late_results": 2, "services_lost": 1, "quarantined": 0}
    )
    console = Console(record=True, width=160)
    print_status(console, status)
    text = console.export_text()
    assert "failure handling" in text
    assert "late results" in text and "services lost" in text
    quiet = Console(record=True, width=160)
    print_status(quiet, scheduler_pb2.StatusResponse())
    assert "failure handling" not in quiet.export_text()
