"""`megaflow.run` / `megaflow.arun`: run tasks on the embedded default (scheduler,
model, agents and local sandboxes in this process) and get the results in memory."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megaflow._results import Result
from megaflow._tasks import Scaffold, TaskLike, task_specs
from megaflow.core.errors import InvalidRequestError

if TYPE_CHECKING:
    from megaflow.deploy.embedded import EmbeddedEnvironment
    from megaflow.model.backend import ModelBackend
    from megaflow.store.ledger import TaskLedger

ScaffoldArg = str | dict[str, Any] | Scaffold | None


class Results(list[Result]):
    """The results of a run, in the order the tasks finished, with the run's id."""

    def __init__(self, results: Iterable[Result] = (), *, run_id: str = "") -> None:
        super().__init__(results)
        self.run_id = run_id
        """The scheduler's id of the run."""

    @property
    def mean_reward(self) -> float | None:
        """The mean reward of the scored tasks; None when none was scored."""
        rewards = [r.reward for r in self if r.reward is not None]
        return sum(rewards) / len(rewards) if rewards else None


def run(
    tasks: Iterable[TaskLike],
    *,
    model: str | ModelBackend = "simulated",
    scaffold: ScaffoldArg = None,
    concurrency: int = 8,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    env: EmbeddedEnvironment | None = None,
    ledger: TaskLedger | None = None,
    sandbox_dir: str | Path | None = None,
    success_rate: float = 0.8,
    seed: int = 0,
    time_scale: float = 1.0,
    on_result: Callable[[Result], None] | None = None,
) -> Results:
    """Run `tasks` to the end on the embedded default and return their results.

    The synchronous form of `arun` (which see); inside a running event loop, use
    `await megaflow.arun(...)` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "megaflow.run() was called inside a running event loop: use await megaflow.arun()"
        )
    return asyncio.run(
        arun(
            tasks,
            model=model,
            scaffold=scaffold,
            concurrency=concurrency,
            out=out,
            resume=resume,
            env=env,
            ledger=ledger,
            sandbox_dir=sandbox_dir,
            success_rate=success_rate,
            seed=seed,
            time_scale=time_scale,
            on_result=on_result,
        )
    )


async def arun(
    tasks: Iterable[TaskLike],
    *,
    model: str | ModelBackend = "simulated",
    scaffold: ScaffoldArg = None,
    concurrency: int = 8,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    env: EmbeddedEnvironment | None = None,
    ledger: TaskLedger | None = None,
    sandbox_dir: str | Path | None = None,
    success_rate: float = 0.8,
    seed: int = 0,
    time_scale: float = 1.0,
    on_result: Callable[[Result], None] | None = None,
) -> Results:
    """Run `tasks` (`megaflow.Task`s, `TaskSpec`s, or anything with `to_proto()`) to
    the end in this process and return one `Result` per task, with its trajectory.

    - `model`: "simulated" (the in-package policy, `success_rate`, `seed`,
      `time_scale`), "openai:http://HOST:PORT[#model]", "transformers:/path", or a
      `ModelBackend`. An OpenAI-compatible server is checked first (GET /v1/models):
      unreachable, a missing or rejected key, or a model it does not serve raises
      `InvalidRequestError` naming the cause, before any task starts.
    - `scaffold`: a scaffold name, or {"type": name, **config}, given to every task
      that names none.
    - `concurrency`: hard cap on tasks (and sandboxes) in flight.
    - `out`: a folder for results.jsonl, trajectories.jsonl and ledger.sqlite; None
      (the default) writes nothing that outlives the call.
    - `resume`: the `out` folder of an earlier run of these tasks (finished or
      interrupted; it may be `out` itself): only the tasks without a scored result
      there (no reward: infrastructure failures, cancelled, never finished) run
      again; the results returned, and the outputs in `out`, hold the earlier scored
      ones too. Tasks are matched by `task_id`.
    - `env`, `ledger`: replace the local sandboxes' Environment Service or the SQLite
      ledger (any `TaskLedger`).
    - `on_result`: called with each result as its task finishes.
    """
    from megaflow.deploy.embedded import EmbeddedSystem
    from megaflow.deploy.run import fresh_ledger, run_batch
    from megaflow.env.service import EnvServiceConfig
    from megaflow.model.factory import backend_from_spec
    from megaflow.model.latency import LatencyConfig
    from megaflow.v1 import scheduler_pb2

    if concurrency < 1:
        raise InvalidRequestError(f"concurrency must be at least 1, got {concurrency}")
    specs = task_specs(list(tasks), scaffold)
    if not specs:
        raise InvalidRequestError("no tasks to run")
    out_dir = Path(out) if out is not None else None
    kept: list[Result] = []
    if resume is not None:
        from megaflow._resume import prepare_resume

        specs, kept = await prepare_resume(Path(resume), specs, out_dir)
    backend = (
        backend_from_spec(
            model,
            success_rate=success_rate,
            seed=seed,
            latency=LatencyConfig(time_scale=time_scale),
        )
        if isinstance(model, str)
        else model
    )
    from megaflow.model.openai import OpenAIBackend

    if isinstance(backend, OpenAIBackend):  # before any task: URL, key and model are right
        await backend.preflight()
    env_config = EnvServiceConfig(max_environments=concurrency)
    if sandbox_dir is not None:
        env_config = EnvServiceConfig(root_dir=Path(sandbox_dir), max_environments=concurrency)
    results = Results(kept)
    if on_result is not None:
        for result in kept:
            on_result(result)
    if not specs:  # everything was scored already
        return results

    def collect(event: scheduler_pb2.TaskEvent, _: object) -> None:
        if event.type == scheduler_pb2.EVENT_TYPE_TASK_FINISHED:
            result = Result.from_proto(
                event.result, event.trajectory if event.HasField("trajectory") else None
            )
            results.append(result)
            if on_result is not None:
                on_result(result)

    with tempfile.TemporaryDirectory(prefix="megaflow-run-") as scratch:
        ledger_path = None
        if ledger is None:
            ledger_path = await fresh_ledger(out_dir) if out_dir else Path(scratch) / "ledger"
        system = EmbeddedSystem(
            backends=[backend],
            ledger=ledger,
            ledger_path=ledger_path,
            env_config=env_config,
            env=env,
        )
        async with system:
            summary = await run_batch(
                system.scheduler,
                specs,
                out_dir,
                max_concurrency=concurrency,
                on_event=collect,
                collect=False,
                append=resume is not None,
            )
    results.run_id = summary.run_id
    return results
