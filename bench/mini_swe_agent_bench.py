"""mini-swe-agent's per-step cost through MegaFlow against mini-swe-agent on its own.

Same tasks (`swe-synth`), same run, same agent: mini-swe-agent 2.4.6's `DefaultAgent`
(timed by `TimedAgent`, a subclass that only reads the clock) with its text-based
config (``mini_textbased.yaml``), answered by the same simulated policy in its text
format with no modelled GPU latency (so the figures are the plumbing, not a model):

- **on its own**: its `LocalEnvironment` (a fresh ``bash -c`` subprocess per command,
  in a temporary folder holding the task's files, with the sandbox's ``PATH``) and a
  model object that asks the policy directly (`PolicyModel`, mini-swe-agent's own text
  parsing);
- **through MegaFlow**: the ``mini-swe-agent`` scaffold in the embedded system: each
  model call through `TaskSession.generate` (the model service, the turn recorded with
  token ids and logprobs), each command in a local sandbox's persistent shell through
  `TaskSession.execute`, both bridged from the agent's thread to the event loop; the
  task's sandbox creation, hidden-test scoring and release are outside the steps.

A step is one `DefaultAgent.step()`: the model query and the command with its
observation. Reported: step p50/p99/mean, its query and execute parts, and the steps
by kind (read = ``cat``, whose command costs ~1 ms, so its difference is the plumbing;
edit and test start a Python), for tasks run one at a time (latency) and 8 at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from minisweagent.agents.default import DefaultAgent
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models.utils.actions_text import format_observation_messages, parse_regex_actions

from bench.stats import ms, pct, print_table
from megaflow.agent.mini_swe_agent import (
    TEXT_ACTION_REGEX,
    TEXT_FORMAT_ERROR,
    MiniSweAgentConfig,
    _to_proto,
)
from megaflow.deploy.embedded import EmbeddedSystem
from megaflow.deploy.run import run_batch
from megaflow.env.local.shell import SAFE_PATH
from megaflow.env.service import EnvServiceConfig
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.simulated_model import SimulatedBackend, SimulatedPolicy
from megaflow.v1 import common_pb2

CONFIG = {"config": ["mini_textbased.yaml"], "model": {"model_class": "litellm_textbased"}}
SUCCESS_RATE = 0.8
PARTS = ("step", "query", "execute", "read step", "edit step", "test step")

_SAMPLES: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
_CURRENT = {"label": ""}


class TimedAgent(DefaultAgent):
    """`DefaultAgent`, timing each step and its query and execute parts (nothing else)."""

    def step(self) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        message = self.query()
        t1 = time.perf_counter()
        observations = self.execute_actions(message)
        t2 = time.perf_counter()
        samples = _SAMPLES[_CURRENT["label"]]
        samples["step"].append(t2 - t0)
        samples["query"].append(t1 - t0)
        samples["execute"].append(t2 - t1)
        samples[f"{_kind(message)} step"].append(t2 - t0)
        return observations


def _kind(message: dict[str, Any]) -> str:
    """Which of the policy's actions a step was: read (`cat`), edit, test."""
    command = " ".join(a["command"] for a in message.get("extra", {}).get("actions", []))
    if command.startswith("cat "):
        return "read"
    return "test" if "unittest" in command else "edit"


class PolicyModel:
    """mini-swe-agent's `Model` protocol answered by the simulated policy in-process."""

    def __init__(self, policy: SimulatedPolicy, task_id: str) -> None:
        self.policy = policy
        self.task_id = task_id
        self.config = MiniSweAgentConfig.model_validate(CONFIG).merged["model"]

    def query(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        reply = self.policy.next_message(self.task_id, [_to_proto(m) for m in messages])
        actions = parse_regex_actions(
            reply.content,
            action_regex=TEXT_ACTION_REGEX,
            format_error_template=TEXT_FORMAT_ERROR,
            template_kwargs={"finish_reason": "stop"},
        )
        extra = {"actions": actions, "cost": 0.0, "timestamp": time.time()}
        return {"role": "assistant", "content": reply.content, "extra": extra}

    def format_message(self, **kwargs: Any) -> dict[str, Any]:
        return dict(kwargs)

    def format_observation_messages(
        self,
        message: dict[str, Any],
        outputs: list[dict[str, Any]],
        template_vars: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        template = self.config["observation_template"]
        return format_observation_messages(
            outputs, observation_template=template, template_vars=template_vars
        )

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return dict(self.config) | kwargs

    def serialize(self) -> dict[str, Any]:
        return {}


def _standalone_task(task: common_pb2.TaskSpec, policy: SimulatedPolicy, root: Path) -> float:
    """One task by mini-swe-agent alone; its wall time."""
    folder = Path(tempfile.mkdtemp(dir=root))
    for rel, content in task.files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    merged = MiniSweAgentConfig.model_validate(CONFIG).merged
    # The sandbox's PATH and no preloaded allocator, as in MegaFlow's sandboxes (here a
    # pyenv shim would put ~0.3 s of bash before every python3).
    env_vars = {**merged["environment"].get("env", {}), "PATH": SAFE_PATH, "LD_PRELOAD": ""}
    env = LocalEnvironment(**{**merged["environment"], "cwd": str(folder), "env": env_vars})
    agent = TimedAgent(PolicyModel(policy, task.task_id), env, **merged["agent"])
    t0 = time.perf_counter()
    info = agent.run(task.problem_statement)
    assert info.get("exit_status") == "Submitted", info
    return time.perf_counter() - t0


async def _standalone(tasks: list[common_pb2.TaskSpec], concurrency: int, root: Path) -> float:
    policy = SimulatedPolicy(SUCCESS_RATE, seed=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(task: common_pb2.TaskSpec) -> float:
        async with gate:
            return await asyncio.to_thread(_standalone_task, task, policy, root)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in tasks))
    return time.perf_counter() - t0


async def _megaflow(tasks: list[common_pb2.TaskSpec], concurrency: int, root: Path) -> float:
    backend = SimulatedBackend.fast(success_rate=SUCCESS_RATE, seed=0)
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=root / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=root / "sb", max_environments=concurrency),
    )
    config = {**CONFIG, "agent": {"agent_class": f"{__name__}.TimedAgent"}}
    for task in tasks:
        task.scaffold.type = "mini-swe-agent"
        task.scaffold.config_json = json.dumps(config)
    async with system:
        t0 = time.perf_counter()
        out = root / "out"
        summary = await run_batch(system.scheduler, tasks, out, max_concurrency=concurrency)
        wall = time.perf_counter() - t0
    bad = [r for r in summary.records if r["status"] != "succeeded"]
    assert not bad, bad[:3]
    return wall


def _row(label: str, part: str) -> tuple[str, ...]:
    values = _SAMPLES[label][part]
    return (
        label,
        part,
        str(len(values)),
        ms(pct(values, 50)),
        ms(pct(values, 99)),
        ms(statistics.fmean(values)),
    )


async def run(quick: bool = False) -> dict[str, Any]:
    n = 4 if quick else 24
    figures: dict[str, Any] = {"tasks": n, "cores": os.cpu_count()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mf-mini-bench-") as tmp:
        root = Path(tmp)
        for concurrency in (1, 8):
            for way in ("standalone", "megaflow"):
                label = f"{way} c={concurrency}"
                _CURRENT["label"] = label
                tasks = generate_tasks(n, seed=21)
                folder = root / label.replace(" ", "-").replace("=", "")
                folder.mkdir()
                run_way = _standalone if way == "standalone" else _megaflow
                wall = await run_way(tasks, concurrency, folder)
                steps = _SAMPLES[label]["step"]
                figures[label] = {
                    "wall_s": wall,
                    "steps": len(steps),
                    **{
                        f"{part}_{stat}": fn(_SAMPLES[label][part])
                        for part in PARTS
                        for stat, fn in (
                            ("p50", lambda v: pct(v, 50)),
                            ("p99", lambda v: pct(v, 99)),
                            ("mean", statistics.fmean),
                        )
                    },
                }
                rows += [_row(label, part) for part in PARTS]
    for c in (1, 8):
        alone, through = figures[f"standalone c={c}"], figures[f"megaflow c={c}"]
        figures[f"overhead_per_step_p50_c{c}"] = through["step_p50"] - alone["step_p50"]
        figures[f"overhead_per_step_mean_c{c}"] = through["step_mean"] - alone["step_mean"]
        figures[f"overhead_read_step_p50_c{c}"] = through["read step_p50"] - alone["read step_p50"]
    print_table(
        f"mini-swe-agent 2.4.6, {n} swe-synth tasks, per step",
        rows,
        ("run", "part", "n", "p50", "p99", "mean"),
    )
    for concurrency in (1, 8):
        print(
            f"c={concurrency}: overhead through MegaFlow per step: "
            f"p50 {ms(figures[f'overhead_per_step_p50_c{concurrency}'])}, "
            f"mean {ms(figures[f'overhead_per_step_mean_c{concurrency}'])}, "
            f"read (cat) step p50 {ms(figures[f'overhead_read_step_p50_c{concurrency}'])}; "
            f"wall standalone {figures[f'standalone c={concurrency}']['wall_s']:.2f} s, "
            f"MegaFlow {figures[f'megaflow c={concurrency}']['wall_s']:.2f} s "
            "(MegaFlow's includes sandbox create/release and hidden-test scoring)",
            flush=True,
        )
    return figures
