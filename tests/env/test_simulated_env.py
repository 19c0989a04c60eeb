"""The simulated Environment Service: an embedded run scores like the real sandboxes."""

from __future__ import annotations

from pathlib import Path

from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import run_batch
from megaflow.env.simulated import SimulatedEnvConfig, SimulatedEnvironmentService
from megaflow.model.simulated import SimulatedBackend, SimulatedPolicy
from megaflow.tasks.swe_synth import generate_tasks


async def test_embedded_run_on_the_simulated_env_gets_the_policy_rewards(tmp_path: Path) -> None:
    env = SimulatedEnvironmentService(SimulatedEnvConfig(step_latency_s=0.001))
    system = EmbeddedSystem(
        backends=[SimulatedBackend.fast(success_rate=0.5)],
        ledger_path=tmp_path / "ledger.sqlite",
        env=env,
    )
    async with system:
        summary = await run_batch(system.scheduler, generate_tasks(40), tmp_path / "out")
    policy = SimulatedPolicy(success_rate=0.5, seed=0)
    assert summary.finished == 40
    for record in summary.records:
        assert record["status"] == "succeeded"
        assert record["reward"] == (1.0 if policy.solves(record["task_id"]) else 0.0)
    assert env.live == 0 and env.created == 40  # every environment released
