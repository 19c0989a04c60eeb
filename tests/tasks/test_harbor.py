"""Harbor task directories: loading (one error per bad task), and running over real
sandboxes with each task's own tests/test.sh deciding the reward."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.tasks.sources import load_tasks
from megaflow.tasks.validate import validate_tasks
from megaflow.testing.scripted import ScriptedBackend, tool_call
from megaflow.v1 import common_pb2
from tests.tasks.test_swebench_e2e import run_agent

HELLO_TEST = """#!/bin/bash
mkdir -p /logs/verifier
if [ "$(cat /workspace/out.txt 2>/dev/null)" = "hello $(cat /workspace/name.txt)" ]; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
"""
SUM_TEST = """#!/bin/bash
python3 $TEST_DIR/test_state.py > /logs/verifier/output.txt 2>&1
echo "$(cat /logs/verifier/output.txt)" > /logs/verifier/reward.txt
"""
SUM_SOLVE = "python3 -c \"print(sum(map(int, open('numbers.txt').read().split())))\" > total.txt\n"
SUM_STATE = """import pathlib
numbers = [int(x) for x in pathlib.Path('/workspace/numbers.txt').read_text().split()]
total = pathlib.Path('/workspace/total.txt')
right = total.exists() and total.read_text().strip() == str(sum(numbers))
print(1 if right else (0.25 if total.exists() else 0))
"""


def write_task(
    root: Path, name: str, *, test: str, solve: str, files: dict[str, str], extra: str = ""
) -> Path:
    folder = root / name
    (folder / "environment").mkdir(parents=True)
    (folder / "tests").mkdir()
    (folder / "solution").mkdir()
    (folder / "task.toml").write_text(
        'version = "1.0"\n\n[metadata]\ndifficulty = "easy"\n\n'
        "[verifier]\ntimeout_sec = 60.0\n\n[agent]\ntimeout_sec = 120.0\n" + extra
    )
    (folder / "instruction.md").write_text(f"# {name}\n\nDo the {name} thing.\n")
    (folder / "environment/Dockerfile").write_text("FROM debian:12\nWORKDIR /workspace\n")
    for path, text in files.items():
        (folder / "environment" / path).write_text(text)
    (folder / "tests/test.sh").write_text(test)
    (folder / "solution/solve.sh").write_text(solve)
    return folder


@pytest.fixture
def harbor_set(tmp_path: Path) -> Path:
    root = tmp_path / "harbor"
    write_task(
        root,
        "hello",
        test=HELLO_TEST,
        solve='echo "hello $(cat name.txt)" > out.txt\n',
        files={"name.txt": "world\n"},
    )
    write_task(
        root,
        "sum",
        test=SUM_TEST,
        solve=SUM_SOLVE,
        files={"numbers.txt": "1 2 3 4\n"},
    )
    (root / "sum/tests/test_state.py").write_text(SUM_STATE)
    return root


def test_harbor_directories_load(harbor_set: Path, tmp_path: Path) -> None:
    broken = write_task(harbor_set, "broken", test="", solve="", files={}, extra="[verifier\n")
    no_instruction = write_task(harbor_set, "quiet", test="exit 0", solve="", files={})
    (no_instruction / "instruction.md").unlink()
    loaded = load_tasks(harbor_set, {"image": "dir:/srv/rootfs"})
    assert [t.task_id for t in loaded.tasks] == ["hello", "sum"]
    hello = loaded.tasks[0]
    assert hello.image == "dir:/srv/rootfs" and hello.family == "harbor"
    assert hello.problem_statement.startswith("# hello")
    assert dict(hello.files) == {"name.txt": b"world\n"}  # the build context, no Dockerfile
    assert hello.hidden_files[".megaflow/harbor/tests/test.sh"] == HELLO_TEST.encode()
    assert hello.budgets.scoring_timeout_s == 60.0 and hello.budgets.task_timeout_s == 120.0
    assert hello.metadata["difficulty"] == "easy"
    assert loaded.gold["hello"].script.startswith("echo")
    errors = {e.source.rsplit("/", 1)[-1]: e for e in loaded.errors}
    assert errors.keys() == {"broken", "quiet"}
    assert errors["broken"].field == "task.toml" and "cannot read it" in errors["broken"].message
    assert errors["quiet"].field == "instruction.md" and errors["quiet"].row == 3
    assert broken.exists()
    # Without an image (MegaFlow builds no Dockerfile) each task says so.
    no_image = load_tasks(harbor_set / "hello")
    assert no_image.tasks == [] and no_image.errors[0].field == "environment.docker_image"


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_harbor_tasks_run_with_their_own_verifiers(
    harbor_set: Path, swebench_rootfs: Path, tmp_path: Path
) -> None:
    loaded = load_tasks(harbor_set, {"image": f"dir:{swebench_rootfs}"})
    assert loaded.errors == []
    async with SandboxEnvironmentService(
        EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=2)
    ) as env:
        checks = await validate_tasks(env, loaded, concurrency=2)
    for check in checks:
        assert check.problems == [], check.task_id
        assert (check.gold_reward, check.unpatched_reward) == (1.0, 0.0)

    # An agent that writes a wrong total: the task's own script gives it 0.25.
    def script(task_id: str, index: int) -> common_pb2.ChatMessage:
        if index == 0:
            return tool_call("bash", command="echo 11 > total.txt")
        return tool_call("submit")

    results = await run_agent(loaded.tasks, ScriptedBackend(script), tmp_path / "run")
    assert results["sum"].has_reward and results["sum"].reward == 0.25
    assert results["hello"].has_reward and results["hello"].reward == 0.0
