"""A third-party scaffold, installed as a package with an entry point, runs tasks end to
end (real sandboxes, hidden tests) with no change to MegaFlow's files; it resumes from a
checkpoint without any resume code of its own; unknown scaffolds, bad configs, crashing
and quitting scaffolds get the outcomes they should."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.agent.scaffold import SCAFFOLDS
from megaflow.agent.session import TaskSession
from megaflow.core.errors import ModelUnavailableError
from megaflow.deploy.run import RunSummary
from megaflow.model.backend import ModelBackend
from megaflow.tasks.swe_synth import generate_tasks, reference_patch
from megaflow.testing.embedded_runs import run_keeping_trajectories
from megaflow.testing.scripted import ScriptedBackend
from megaflow.v1 import common_pb2

pytestmark = pytest.mark.integration

PLUGIN = Path(__file__).parent / "scaffold_plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The plug-in package pip-installed (with its entry point) into a scratch folder on
    sys.path: what `pip install megaflow-text-agent` does for a user."""
    scratch = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN, scratch / "src")
    target = scratch / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("megaflow_text_agent")]:
            del sys.modules[name]


def _text(command: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role="assistant", content=f"```bash\n{command}\n```")


def _fix_command(task: common_pb2.TaskSpec) -> str:
    path, old, new = reference_patch(task)
    code = (
        f"import pathlib; p = pathlib.Path({path!r}); "
        f"p.write_text(p.read_text().replace({old!r}, {new!r}, 1))"
    )
    return f"python3 -c {shlex.quote(code)}"


def _script(tasks: list[common_pb2.TaskSpec], fail_at: int | None = None) -> ScriptedBackend:
    """A model that answers the text agent: look, fix, submit (and, with `fail_at`, fails
    that call of each task once, as a lost replica would)."""
    by_id = {t.task_id: t for t in tasks}
    failed: set[str] = set()

    def step(task_id: str, index: int) -> common_pb2.ChatMessage | BaseException:
        task = by_id[task_id]
        if index == fail_at and task_id not in failed:
            failed.add(task_id)
            return ModelUnavailableError("injected: replica lost")
        if index == 0:
            return _text(f"cat {reference_patch(task)[0]}")
        if index == 1:
            return _text(_fix_command(task))
        return _text("SUBMIT")

    return ScriptedBackend(step)


async def _run(
    tmp_path: Path, backend: ModelBackend, tasks: list[common_pb2.TaskSpec]
) -> tuple[RunSummary, dict[str, common_pb2.Trajectory]]:
    return await run_keeping_trajectories(tmp_path, backend, tasks)


def _tasks(n: int, scaffold: str, config_json: str = "") -> list[common_pb2.TaskSpec]:
    tasks = generate_tasks(n, seed=3)
    for task in tasks:
        task.scaffold.type = scaffold
        task.scaffold.config_json = config_json
    return tasks


async def test_an_entry_point_scaffold_solves_tasks(installed: Path, tmp_path: Path) -> None:
    assert "text-agent" in SCAFFOLDS.names()
    tasks = _tasks(2, "text-agent", '{"system_prompt": "Fix it. One ```bash block."}')
    summary, trajectories = await _run(tmp_path, _script(tasks), tasks)
    assert [r["status"] for r in summary.records] == ["succeeded"] * 2
    assert [r["reward"] for r in summary.records] == [1.0] * 2  # the hidden tests passed
    for trajectory in trajectories.values():
        assert trajectory.messages[0].content == "Fix it. One ```bash block."  # its config
        assert not trajectory.turns[0].response.tool_calls  # text, not tool calls
        kinds = [a.kind for t in trajectory.turns for a in t.actions]
        assert kinds == ["execute", "execute"]  # recorded by the session, not the scaffold


async def test_an_entry_point_scaffold_resumes_from_its_checkpoint(
    installed: Path, tmp_path: Path
) -> None:
    tasks = _tasks(1, "text-agent")
    summary, trajectories = await _run(tmp_path, _script(tasks, fail_at=2), tasks)
    (record,) = summary.records
    assert record["status"] == "succeeded" and record["reward"] == 1.0
    assert record["attempts"] == 2
    (trajectory,) = trajectories.values()
    (resumption,) = trajectory.resumptions
    assert resumption.at_turn == 2
    assert resumption.replayed_actions == 1  # the fix re-applied; the `cat` from the record
    assert len(trajectory.turns) == 3


async def test_a_dotted_path_scaffold_needs_no_installation(tmp_path: Path) -> None:
    tasks = _tasks(1, f"{__name__}:Quitter")
    summary, _ = await _run(tmp_path, _script(tasks), tasks)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_kind"] == "task"
    assert record["reward"] == 0.0
    assert "without submitting" in record["error"]


async def test_a_crashing_scaffold_is_not_scored(tmp_path: Path) -> None:
    tasks = _tasks(1, f"{__name__}:Crasher")
    summary, _ = await _run(tmp_path, _script(tasks), tasks)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_kind"] == "invalid"
    assert record["reward"] is None and record["attempts"] == 1
    assert "ZeroDivisionError" in record["error"]


@pytest.mark.parametrize(
    ("scaffold", "config", "message"),
    [
        ("no-such-agent", "", "unknown scaffold 'no-such-agent'; known: "),
        ("tool-agent", '{"nudge": 3}', "nudge: Input should be a valid string"),
        ("tool-agent", '{"temperature": 1}', "temperature: Extra inputs are not permitted"),
    ],
)
async def test_unknown_scaffolds_and_bad_configs_are_invalid(
    tmp_path: Path, scaffold: str, config: str, message: str
) -> None:
    tasks = _tasks(1, scaffold, config)
    summary, _ = await _run(tmp_path, _script(tasks), tasks)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_kind"] == "invalid"
    assert record["reward"] is None
    assert message in record["error"]


class _NoConfig:
    from megaflow.agent.tool_agent import ToolAgentConfig as Config  # any pydantic model

    def __init__(self, config: object) -> None:
        self.config = config


class Quitter(_NoConfig):
    async def run(self, session: TaskSession) -> None:
        await session.execute("true")


class Crasher(_NoConfig):
    async def run(self, session: TaskSession) -> None:
        await session.execute("true")
        print(1 / 0)
