"""SWE-bench scoring: the pytest log parser, the in-sandbox runner (test patch, exact
ids, test files reset to the base commit) and `evaluate()` over a real sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from megaflow.env.evaluation.log_parsers import LOG_PARSERS, parse_pytest
from megaflow.env.evaluation.spec import EvalSpec, read_spec
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.tasks.swebench import SweBenchConfig, SweBenchRow
from megaflow.v1 import env_pb2

HOST_PYTEST = f"{sys.executable} -m pytest -rA --tb=short -p no:cacheprovider"


def test_pytest_parser_reads_ids_with_spaces_dashes_and_teardown_errors() -> None:
    log = "\n".join(
        [
            "PASSED t.py::test_a[x - y]",
            "FAILED t.py::test_b[it's [1]] - AssertionError: 1 - 2",
            "PASSED t.py::test_c",
            "ERROR t.py::test_c - teardown failed",
            "SKIPPED [1] t.py:9: no network",
            "XFAIL t.py::test_d - known",
            "PASSED t.py::test_unasked",
        ]
    )
    wanted = ["t.py::test_a[x - y]", "t.py::test_b[it's [1]]", "t.py::test_c", "t.py::test_d"]
    assert parse_pytest(log, wanted) == {
        "t.py::test_a[x - y]": "passed",
        "t.py::test_b[it's [1]]": "failed",
        "t.py::test_c": "error",
        "t.py::test_d": "passed",
    }
    assert LOG_PARSERS.get("pytest") is parse_pytest


def test_score_needs_every_test_and_reads_reward_files() -> None:
    spec = EvalSpec.model_validate(
        {"tests": [{"test_id": "a", "group": "FAIL_TO_PASS"}, {"test_id": "b"}]}
    )
    reward, outcomes = spec.score({spec.log_path: b"PASSED a\nPASSED b\n"})
    assert reward == 1.0 and [o.status for o in outcomes] == ["passed", "passed"]
    reward, outcomes = spec.score({spec.log_path: b"PASSED a\n"})
    assert reward == 0.0 and [(o.test_id, o.status) for o in outcomes] == [
        ("a", "passed"),
        ("b", "missing"),
    ]
    assert outcomes[0].group == "FAIL_TO_PASS"
    harbor = EvalSpec(reward_path="r.txt")
    assert harbor.score({"r.txt": b"0.75\n"})[0] == 0.75
    assert harbor.score({"r.txt": None})[0] == 0.0
    assert harbor.score({"r.txt": b"nan"})[0] == 0.0


def _checkout(rows: list[dict[str, Any]], url_template: str, index: int, dest: Path) -> None:
    url = url_template.format(repo=rows[index]["repo"])
    subprocess.run(["git", "clone", "-q", url, str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", rows[index]["base_commit"]], cwd=dest, check=True)


def _run_evaluation(task_hidden: dict[str, bytes], eval_command: str, repo: Path) -> str:
    for path, content in task_hidden.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(content)
    command = eval_command.replace("python3", sys.executable, 1)
    done = subprocess.run(command, shell=True, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return (repo / ".megaflow/eval/test_output.log").read_text()


def test_runner_applies_test_patch_resets_tests_and_passes_ids_exactly(
    mpmath_set: tuple[list[dict[str, Any]], str], tmp_path: Path
) -> None:
    rows, url_template = mpmath_set
    row = SweBenchRow.model_validate(rows[0])
    task = row.to_task(SweBenchConfig.model_validate({"default_spec": {"test_cmd": HOST_PYTEST}}))
    spec = read_spec(dict(task.hidden_files))
    assert spec is not None
    repo = tmp_path / "repo"
    _checkout(rows, url_template, 0, repo)
    # The agent "fixes" the tests instead of the code: the reset to base_commit undoes it.
    tests = repo / "mpmath/tests/test_bitwise.py"
    tests.write_text(tests.read_text() + "\ndef trailing(n):\n    return 100\n")
    log = _run_evaluation(dict(task.hidden_files), task.eval_command, repo)
    reward, outcomes = spec.score({spec.log_path: log.encode()})
    statuses = {(o.group, o.test_id.split("::")[1]): o.status for o in outcomes}
    assert reward == 0.0
    assert statuses[("FAIL_TO_PASS", "test_trailing")] == "failed"
    assert statuses[("FAIL_TO_PASS", "test_trailing_cases[it's [2**100]]")] == "failed"
    assert statuses[("PASS_TO_PASS", 'test_trailing_cases[x = "3 << 40"]')] == "passed"
    assert statuses[("PASS_TO_PASS", "test_trailing_cases[2**100 - 1]")] == "passed"

    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    subprocess.run(["git", "apply"], input=row.patch, text=True, cwd=repo, check=True)
    log = _run_evaluation(dict(task.hidden_files), task.eval_command, repo)
    reward, outcomes = spec.score({spec.log_path: log.encode()})
    assert reward == 1.0, log
    assert len(outcomes) == len(row.FAIL_TO_PASS) + len(row.PASS_TO_PASS)


@pytest.fixture
async def env_service(tmp_path: Path) -> AsyncIterator[SandboxEnvironmentService]:
    svc = SandboxEnvironmentService(EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=2))
    async with svc:
        yield svc


def _files(repo: Path) -> dict[str, bytes]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=repo, check=True, capture_output=True
    ).stdout
    return {p: (repo / p).read_bytes() for p in listed.decode().split("\0") if p}


@pytest.mark.integration
async def test_evaluate_records_outcomes_in_a_real_sandbox(
    mpmath_set: tuple[list[dict[str, Any]], str],
    swebench_rootfs: Path,
    env_service: SandboxEnvironmentService,
    tmp_path: Path,
) -> None:
    """The repository given as files (no .git: no reset), scored inside bubblewrap."""
    rows, url_template = mpmath_set
    row = SweBenchRow.model_validate(rows[1])
    task = row.to_task()
    repo = tmp_path / "repo"
    _checkout(rows, url_template, 1, repo)
    files = _files(repo)

    async def submit(patched: bool) -> env_pb2.SubmitActionResponse:
        created = await env_service.create_environment(
            env_pb2.CreateEnvironmentRequest(
                owner="t",
                image=f"dir:{swebench_rootfs}",
                files=files,
                hidden_files=task.hidden_files,
                eval_command=task.eval_command,
            )
        )
        try:
            if patched:
                path = "mpmath/libmp/libmpf.py"
                fixed = files[path].replace(
                    b"    if texp > sexp+sbc:", b"    if ssign == tsign and texp > sexp+sbc:"
                )
                await env_service.submit_action(
                    env_pb2.SubmitActionRequest(
                        env_id=created.env_id,
                        write_file=env_pb2.WriteFile(path=path, content=fixed),
                    )
                )
            # Whatever the agent leaves where the log goes is not read as a result.
            await env_service.submit_action(
                env_pb2.SubmitActionRequest(
                    env_id=created.env_id,
                    write_file=env_pb2.WriteFile(
                        path=".megaflow/eval/test_output.log",
                        content="".join(
                            f"PASSED {t}\n" for t in json.loads(rows[1]["FAIL_TO_PASS"])
                        ).encode(),
                    ),
                )
            )
            return await env_service.submit_action(
                env_pb2.SubmitActionRequest(env_id=created.env_id, submit=env_pb2.Submit())
            )
        finally:
            await env_service.release_environment(
                env_pb2.ReleaseEnvironmentRequest(env_id=created.env_id)
            )

    unpatched = await submit(patched=False)
    assert unpatched.has_reward and unpatched.reward == 0.0, unpatched.eval_output
    outcomes = {t.test_id: (t.group, t.status) for t in unpatched.tests}
    assert outcomes["mpmath/tests/test_division.py::test_mod"] == ("FAIL_TO_PASS", "failed")
    assert outcomes["mpmath/tests/test_division.py::test_div_1_3"] == ("PASS_TO_PASS", "passed")
    assert "2 of 3 tests passed" in unpatched.message
    fixed = await submit(patched=True)
    assert fixed.reward == 1.0, fixed.eval_output
    assert [t.status for t in fixed.tests] == ["passed"] * 3
