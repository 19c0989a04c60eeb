"""Admission control through the scheduler's shell, with in-process services."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import run_batch
from megaflow.rpc.resolver import ServiceResolver
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.scheduler.state import KIND_ENV, SchedulerPolicy
from megaflow.store.sqlite import SqliteLedger
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_env import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, scheduler_pb2


def _spec(task_id: str, **fields: object) -> common_pb2.TaskSpec:
    return common_pb2.TaskSpec(task_id=task_id, problem_statement="p", **fields)  # type: ignore[arg-type]


async def test_a_task_no_host_can_ever_hold_is_rejected_at_submit(tmp_path: Path) -> None:
    scheduler = SchedulerServiceImpl(
        SqliteLedger(tmp_path / "ledger.sqlite"),
        ServiceResolver(),
        policy=SchedulerPolicy(pools={"gpu": 1}),
    )
    await scheduler.start()
    try:
        big = common_pb2.ResourceRequirements(cpu_millis=8000)
        # No env host yet: accepted, it waits for one that can hold it.
        reply = await scheduler.submit_tasks(
            scheduler_pb2.SubmitTasksRequest(run_id="early", tasks=[_spec("early", resources=big)])
        )
        assert reply.task_ids == ["early"]
        await scheduler.register_service(
            scheduler_pb2.RegisterServiceRequest(
                kind=KIND_ENV,
                address="127.0.0.1:9",
                capacity=4,
                resources=scheduler_pb2.HostResources(cpu_millis=4000, memory_mib=8192),
            )
        )
        with pytest.raises(InvalidRequestError, match=r"'huge'.*cpu_millis=8000"):
            await scheduler.submit_tasks(
                scheduler_pb2.SubmitTasksRequest(tasks=[_spec("ok"), _spec("huge", resources=big)])
            )
        gpu = common_pb2.ResourceRequirements(gpus=1, accelerator="a100")
        with pytest.raises(InvalidRequestError, match=r"'g'.*gpus=1"):
            await scheduler.submit_tasks(
                scheduler_pb2.SubmitTasksRequest(tasks=[_spec("g", resources=gpu)])
            )
        with pytest.raises(InvalidRequestError, match=r"'p'.*pool 'tpu'"):
            await scheduler.submit_tasks(
                scheduler_pb2.SubmitTasksRequest(tasks=[_spec("p", pool="tpu")])
            )
        status = await scheduler.status(scheduler_pb2.StatusRequest())
        assert status.queued == 1  # only the early task: a rejected request adds nothing
        assert status.services[0].resources.cpu_millis == 4000
    finally:
        await scheduler.stop()


async def test_sandboxes_still_starting_count_against_the_cap(tmp_path: Path) -> None:
    env = SimulatedEnvironmentService(SimulatedEnvConfig(create_latency_s=0.3, max_environments=2))
    system = EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=1.0)],
        ledger_path=tmp_path / "ledger.sqlite",
        env=env,
    )
    async with system:
        run = asyncio.create_task(run_batch(system.scheduler, generate_tasks(5), tmp_path / "out"))
        for _ in range(200):
            if env.created == 2:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # both sandboxes are still being created
        status = await system.scheduler.status(scheduler_pb2.StatusRequest())
        (env_status,) = [svc for svc in status.services if svc.kind == KIND_ENV]
        assert env.created == 2 and env_status.in_flight == 2
        assert (status.running, status.queued) == (2, 3)
        assert status.runs[0].queued == 3 and status.runs[0].in_flight == 2
        assert status.oldest_wait_s > 0
        summary = await run
    assert summary.count("succeeded") == 5 and summary.retries == 0  # never over the cap
    status = await system.scheduler.status(scheduler_pb2.StatusRequest())
    assert status.wait_samples == 5 and status.wait_p99_s >= 0.3  # three waited for a slot


async def test_a_model_rate_limit_spaces_dispatches_and_the_run_completes(tmp_path: Path) -> None:
    system = EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=1.0)],
        ledger_path=tmp_path / "ledger.sqlite",
        env=SimulatedEnvironmentService(),
        policy=SchedulerPolicy(model_dispatch_rate={"": 20.0}, pools={"gpu": 2}),
    )
    tasks = generate_tasks(30)
    for task in tasks:
        task.pool = "gpu"
    async with system:
        summary = await run_batch(system.scheduler, tasks, tmp_path / "out")
        status = await system.scheduler.status(scheduler_pb2.StatusRequest())
    assert summary.count("succeeded") == 30
    # a burst of 20 tokens, then 20 per second: the last ten waited about half a second
    assert summary.wall_s >= 0.4
    assert {p.name: (p.in_flight, p.limit) for p in status.pools}["pool:gpu"] == (0, 2)
