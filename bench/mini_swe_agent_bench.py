"""mini-swe-agent's per-step cost through MegaFlow against mini-swe-agent on its own.

Same tasks (`swe-synth`), same run, same agent: mini-swe-agent 2.4.6's `DefaultAgent`
(timed by `TimedAgent`, a subclass that only reads the clock) with its text-based
config (``mini_textbased.yaml``), answered by the same simulated policy in its text
format with no modelled GPU latency (so the figures are the plumbing, not a model):

- **on its own**: its `LocalEnvironment` (a fresh ``bash -c`` subprocess per command,
  in a temporary folder holding the task's files, with the sandbox's ``PATH``) and its
  own ``LitellmTextbasedModel`` calling a bare OpenAI-compatible aiohttp server
  (`PolicyServer`, on this process's event loop) that answers with the policy — as it
  would call a model server;
- **through MegaFlow**: the ``mini-swe-agent`` scaffold in the embedded system: the same
  litellm model class calling the task's gateway endpoint over loopback HTTP, answered
  by `TaskSession.generate` (the model service, the turn recorded with token ids and
  logprobs), each command in a local sandbox's persistent shell through
  `TaskSession.execute`, bridged from the agent's thread to the event loop; the task's
  sandbox creation, hidden-test scoring and release are outside the steps.

Two workloads: ``echo`` (20 steps of ``echo hi``, then submit: what is left of a step is
the plumbing) and ``swe-synth`` (the simulated policy solving the task: read, edit,
test, whose commands start Pythons). A step is one `DefaultAgent.step()`: the model
query and the command with its observation (the submitting step raises inside it and
is not counted). Reported: step p50/p99/mean and its query and execute parts, the
swe-synth steps by kind, for tasks run one at a time (latency) and 8 at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from minisweagent.agents.default import DefaultAgent
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models import get_model

from bench.stats import ms, pct, print_table
from megaflow.agent.mini_swe_agent import MiniSweAgentConfig  # sets litellm offline first
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
ECHO_STEPS = 20


class EchoPolicy:
    """`echo hi` for ECHO_STEPS steps, then mini-swe-agent's submit command: what is left
    of a step is the plumbing (a command that costs ~nothing, a model that answers at once)."""

    def next_message(
        self, task_id: str, messages: Any, tools: Any = (), tool_choice: str = ""
    ) -> common_pb2.ChatMessage:
        done = sum(1 for m in messages if m.role == "assistant")
        command = "echo hi" if done < ECHO_STEPS else "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
        content = f"THOUGHT: step {done}.\n\n```mswea_bash_command\n{command}\n```"
        return common_pb2.ChatMessage(role="assistant", content=content)


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
    if command.startswith("echo "):
        return "echo"
    return "test" if "unittest" in command else "edit"


class PolicyServer:
    """A bare OpenAI-compatible chat server (aiohttp, on this process's event loop) that
    answers with the policy: what mini-swe-agent on its own talks to, standing in for a
    model server. The API key is the task id."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        task_id = request.headers.get("Authorization", "")[7:]
        messages = [_to_proto(m) for m in body["messages"]]
        reply = self.policy.next_message(task_id, messages)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def __aenter__(self) -> PolicyServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _to_proto(message: dict[str, Any]) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=message["role"], content=message.get("content") or "")


def _standalone_task(task: common_pb2.TaskSpec, port: int, root: Path) -> float:
    """One task by mini-swe-agent alone (its litellm model, against `PolicyServer`); its
    wall time."""
    folder = Path(tempfile.mkdtemp(dir=root))
    for rel, content in task.files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    merged = MiniSweAgentConfig.model_validate(CONFIG).merged
    # The sandbox's PATH and no preloaded allocator, as in MegaFlow's sandboxes (here a
    # pyenv shim would put ~0.3 s of bash before every python3).
    env_vars = {**merged["environment"].get("env", {}), "PATH": SAFE_PATH, "LD_PRELOAD": ""}
    env = LocalEnvironment(**{**merged["environment"], "cwd": str(folder), "env": env_vars})
    model = get_model(
        config={
            **merged["model"],
            "model_name": "openai/policy",
            "cost_tracking": "ignore_errors",
            "model_kwargs": {
                "api_base": f"http://127.0.0.1:{port}/v1",
                "api_key": task.task_id,
                "max_retries": 0,
            },
        }
    )
    agent = TimedAgent(model, env, **merged["agent"])
    t0 = time.perf_counter()
    info = agent.run(task.problem_statement)
    assert info.get("exit_status") == "Submitted", info
    return time.perf_counter() - t0


async def _standalone(
    tasks: list[common_pb2.TaskSpec], concurrency: int, root: Path, policy: Any
) -> float:
    loop = asyncio.get_running_loop()
    async with PolicyServer(policy) as server:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:  # a thread a task, as MegaFlow
            t0 = time.perf_counter()
            await asyncio.gather(
                *(loop.run_in_executor(pool, _standalone_task, t, server.port, root) for t in tasks)
            )
            return time.perf_counter() - t0


async def _megaflow(
    tasks: list[common_pb2.TaskSpec], concurrency: int, root: Path, policy: Any
) -> float:
    backend = SimulatedBackend.fast(success_rate=SUCCESS_RATE, seed=0)
    backend.policy = policy  # the same policy object as on its own
    system = EmbeddedSystem(
        backends=[backend],
        ledger_path=root / "ledger.sqlite",
        env_config=EnvServiceConfig(root_dir=root / "sb", max_environments=concurrency),
    )
    config = {**CONFIG, "agent": {"agent_class": f"{__name__}.TimedAgent"}}
    for task in tasks:
        task.scaffold.type = "mini-swe-agent"
        task.scaffold.config_json = json.dumps(config)
        task.budgets.max_steps = max(task.budgets.max_steps, ECHO_STEPS + 5)
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


async def run(
    quick: bool = False, tasks: int | None = None, rounds: int | None = None
) -> dict[str, Any]:
    """`tasks` and `rounds` override the defaults (16 x 3; quick: 4 x 1)."""
    n, rounds = (4, 1) if quick else (tasks or 16, rounds or 3)
    figures: dict[str, Any] = {
        "tasks": n,
        "rounds": rounds,
        "cores": os.cpu_count(),
        "echo_steps": ECHO_STEPS,
    }
    walls: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="mf-mini-bench-") as tmp:
        root = Path(tmp)
        # Warm-up, not counted: litellm's import and first call (seconds) land here.
        _CURRENT["label"] = "warm-up"
        (root / "warm-up").mkdir()
        await _standalone(generate_tasks(1, seed=21), 1, root / "warm-up", EchoPolicy())
        _SAMPLES.pop("warm-up", None)
        # Rounds, the two ways alternating which goes first: the machine's load drifts.
        for r in range(rounds):
            ways = ("standalone", "megaflow") if r % 2 == 0 else ("megaflow", "standalone")
            for concurrency in (1, 8):
                for workload in ("echo", "swe-synth"):
                    for way in ways:
                        label = f"{workload} {way} c={concurrency}"
                        _CURRENT["label"] = label
                        tasks = generate_tasks(n, seed=21)
                        folder = root / f"{label}-{r}".replace(" ", "-").replace("=", "")
                        folder.mkdir()
                        policy: Any = (
                            EchoPolicy() if workload == "echo" else SimulatedPolicy(SUCCESS_RATE)
                        )
                        run_way = _standalone if way == "standalone" else _megaflow
                        walls[label].append(await run_way(tasks, concurrency, folder, policy))
    rows = []
    for label, wall in walls.items():
        samples = _SAMPLES[label]
        figures[label] = {"wall_s": statistics.fmean(wall), "steps": len(samples["step"])}
        for part in PARTS:
            if samples.get(part):
                figures[label] |= _stats(part, samples[part])
                rows.append(_row(label, part))
    for c in (1, 8):
        for workload in ("echo", "swe-synth"):
            alone = figures[f"{workload} standalone c={c}"]
            through = figures[f"{workload} megaflow c={c}"]
            for stat in ("p50", "mean"):
                key = f"overhead_{workload}_step_{stat}_c{c}"
                figures[key] = through[f"step_{stat}"] - alone[f"step_{stat}"]
    print_table(
        f"mini-swe-agent 2.4.6 per step, {rounds} x {n} tasks ({ECHO_STEPS} `echo hi` steps each, "
        "or a swe-synth task solved by the simulated policy)",
        rows,
        ("run", "part", "n", "p50", "p99", "mean"),
    )
    for c in (1, 8):
        for workload in ("echo", "swe-synth"):
            print(
                f"{workload} c={c}: MegaFlow minus standalone per step: "
                f"p50 {ms(figures[f'overhead_{workload}_step_p50_c{c}'])}, "
                f"mean {ms(figures[f'overhead_{workload}_step_mean_c{c}'])}; "
                f"wall of {n} tasks: standalone "
                f"{figures[f'{workload} standalone c={c}']['wall_s']:.2f} s, "
                f"MegaFlow {figures[f'{workload} megaflow c={c}']['wall_s']:.2f} s "
                "(with sandbox create/release and hidden-test scoring)",
                flush=True,
            )
    return figures


def _stats(part: str, values: list[float]) -> dict[str, float]:
    return {
        f"{part}_p50": pct(values, 50),
        f"{part}_p99": pct(values, 99),
        f"{part}_mean": statistics.fmean(values),
    }
