"""Harbor's own CLI (PyPI `harbor==0.25.0`, unmodified) with MegaFlow as its environment.

Harbor needs Python >= 3.12, MegaFlow runs on 3.11: ``./dev`` (setup_harbor) builds a
Debian 13 rootfs with Python 3.13 and a venv holding Harbor, under
/opt/megaflow/harbor-trixie (``$MEGAFLOW_HARBOR_ROOT``). Here `harbor run` runs from it
under bubblewrap (the host's network, so it reaches MegaFlow on loopback), loads
`megaflow/integrations/harbor_env.py` by import path (``--env
harbor_env:MegaFlowEnvironment``; only that file is on its PYTHONPATH) and runs Harbor's
``oracle`` agent (each task's solution/solve.sh, no model) over a set of Harbor tasks
written here, 2 attempts each, 16 trials at once. Every trial's sandbox is a MegaFlow
sandbox of `megaflow serve openenv` (a separate process, stopped by PID); the rewards
come from the tasks' own tests/test.sh, and no sandbox is left after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import megaflow.integrations
from megaflow.testing.processes import ServiceProcess, live_sandboxes, openenv_server

pytestmark = pytest.mark.integration

HARBOR_ROOT = Path(os.environ.get("MEGAFLOW_HARBOR_ROOT", "/opt/megaflow/harbor-trixie"))
HARBOR_PIN = "harbor==0.25.0"
ADAPTER = Path(megaflow.integrations.__file__).parent / "harbor_env.py"
WRITABLE = ("/logs", "/tests", "/solution", "/app")
ATTEMPTS = 2
CONCURRENT = 16

CHECK = "if {cond}; then r=1; else r=0; fi; echo $r > /logs/verifier/reward.txt\n"


def _task(
    toml: str = "",
    solve: str = "",
    test: str = "",
    *,
    env_files: dict[str, str | bytes] | None = None,
    test_files: dict[str, str] | None = None,
    solution_files: dict[str, str | bytes] | None = None,
    agent_timeout_s: float = 120.0,
) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {
        "task.toml": 'schema_version = "1.4"\n[verifier]\ntimeout_sec = 120.0\n'
        f"[agent]\ntimeout_sec = {agent_timeout_s}\n" + toml,
        "instruction.md": "Do what solution/solve.sh does.\n",
        "environment/Dockerfile": "FROM debian:12\n",
        "solution/solve.sh": "#!/bin/bash\nset -e\n" + solve,
        "tests/test.sh": "#!/bin/bash\n" + test,
    }
    for prefix, extra in (
        ("environment", env_files),
        ("tests", test_files),
        ("solution", solution_files),
    ):
        files.update({f"{prefix}/{k}": v for k, v in (extra or {}).items()})
    return files


BINARY = random.Random(16).randbytes(9 * 1024 * 1024)  # more than one 6 MiB transfer piece
BINARY_SHA256 = hashlib.sha256(BINARY).hexdigest()
TASKS: dict[str, tuple[dict[str, str | bytes], dict[str, float]]] = {
    # name: (files, the rewards its oracle run deserves)
    "hello": (
        _task(
            solve="echo hello > hello.txt\n",
            test=CHECK.format(cond='[ "$(cat hello.txt)" = hello ]'),
        ),
        {"reward": 1.0},
    ),
    "wrong-answer": (
        _task(
            solve="echo goodbye > hello.txt\n",
            test=CHECK.format(cond='[ "$(cat hello.txt)" = hello ]'),
        ),
        {"reward": 0.0},
    ),
    "solution-fails": (  # solve.sh exits 1 before doing the work; the verifier still runs
        _task(
            solve="false\necho done > out.txt\n",
            test=CHECK.format(cond="[ -f out.txt ]"),
        ),
        {"reward": 0.0},
    ),
    "build-context": (  # environment/ (less its Dockerfile) starts the workdir
        _task(
            solve="awk '{s+=$1} END {print s}' numbers.txt > sum.txt\n",
            test=CHECK.format(cond='[ "$(cat sum.txt)" = 60 ] && [ ! -e Dockerfile ]'),
            env_files={"numbers.txt": "10\n20\n30\n"},
        ),
        {"reward": 1.0},
    ),
    "binary-files": (  # a binary solution file goes up, byte for byte
        _task(
            solve="cp /solution/blob.bin blob.bin\n",
            test=CHECK.format(cond=f'[ "$(sha256sum < blob.bin | cut -c1-64)" = {BINARY_SHA256} ]'),
            solution_files={"blob.bin": BINARY},
        ),
        {"reward": 1.0},
    ),
    "helper-in-tests": (  # tests/ holds more than test.sh; run from /tests
        _task(
            solve="echo 42 > answer.txt\n",
            test="python3 /tests/check.py\n",
            test_files={
                "check.py": "import pathlib\n"
                "ok = pathlib.Path('answer.txt').read_text().strip() == '42'\n"
                "pathlib.Path('/logs/verifier/reward.txt').write_text('1' if ok else '0')\n"
            },
        ),
        {"reward": 1.0},
    ),
    "partial-credit": (
        _task(solve="true\n", test="echo 0.25 > /logs/verifier/reward.txt\n"),
        {"reward": 0.25},
    ),
    "reward-json": (  # several named rewards in reward.json
        _task(
            solve="echo a > a.txt\n",
            test='echo \'{"correct": 1, "style": 0.5}\' > /logs/verifier/reward.json\n',
        ),
        {"correct": 1.0, "style": 0.5},
    ),
    "task-env": (  # [environment].env reaches every command
        _task(
            toml='[environment]\nenv = { GREETING = "bonjour" }\n',
            solve='echo "$GREETING" > greeting.txt\n',
            test=CHECK.format(cond='[ "$(cat greeting.txt)" = bonjour ]'),
        ),
        {"reward": 1.0},
    ),
    "workdir-app": (  # a task workdir outside /workspace (the server lets /app be written)
        _task(
            toml='[environment]\nworkdir = "/app"\n',
            solve="pwd > where.txt\n",
            test=CHECK.format(cond='[ "$(cat /app/where.txt)" = /app ] && [ "$PWD" = /app ]'),
        ),
        {"reward": 1.0},
    ),
    "no-network": (  # enforced: the sandbox has only loopback
        _task(
            toml='[environment]\nnetwork_mode = "no-network"\n',
            solve="(exec 3<>/dev/tcp/1.1.1.1/53) 2>/dev/null && echo online > net.txt "
            "|| echo offline > net.txt\n",
            test=CHECK.format(cond='[ "$(cat net.txt)" = offline ]'),
        ),
        {"reward": 1.0},
    ),
    "agent-timeout": (  # the oracle runs past the agent's timeout: Harbor cancels its exec,
        # the command stops in the sandbox, and the verifier runs at once
        _task(
            solve="echo started > started.txt\nsleep 40\necho late > late.txt\n",
            test=CHECK.format(cond="[ -f started.txt ] && [ ! -f late.txt ] && ! pgrep -x sleep"),
            agent_timeout_s=3.0,
        ),
        {"reward": 1.0},
    ),
    "big-log": (  # verifier output larger than a step's output cap (and than a transfer
        # piece, 9 MiB of random bytes) comes back whole
        _task(
            solve="true\n",
            test="seq 1 200000 > /logs/verifier/big.txt\n"
            "head -c 9437184 /dev/urandom > /logs/verifier/random.bin\n"
            "sha256sum < /logs/verifier/random.bin | cut -c1-64 > /logs/verifier/random.sha256\n"
            "echo 1 > /logs/verifier/reward.txt\n",
        ),
        {"reward": 1.0},
    ),
}


@pytest.fixture(scope="module")
def harbor_root() -> Path:
    """The rootfs `./dev` builds (setup_harbor). Missing is a failure, not a skip."""
    stamp = HARBOR_ROOT / ".megaflow-harbor"
    if not stamp.is_file() or stamp.read_text() != HARBOR_PIN:
        pytest.fail(
            f"Harbor's rootfs is missing or not {HARBOR_PIN} ({stamp}): run `./dev setup` "
            "(setup_harbor: debootstrap trixie + a venv with Harbor; needs root, network "
            "to the Debian mirror and PyPI)"
        )
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is needed to run Harbor from its rootfs: ./dev setup")
    return HARBOR_ROOT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    tmp = tmp_path_factory.mktemp("harbor-openenv")
    writable = [arg for path in WRITABLE for arg in ("--writable-dir", path)]
    with openenv_server(tmp, *writable) as proc:
        yield proc, tmp / "sandboxes"


def _write_tasks(folder: Path) -> None:
    for name, (files, _) in TASKS.items():
        for rel, content in files.items():
            path = folder / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)


def _harbor(root: Path, work: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`harbor ARGS` in its rootfs (read-only: the cached copy stays as built): host
    network, /proc, /dev; `work` at /work; the adapter alone on PYTHONPATH."""
    argv = [
        "bwrap",
        "--ro-bind", str(root), "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf",
        "--dir", "/work",
        "--bind", str(work), "/work",
        "--dir", "/opt/megaflow-adapter",
        "--ro-bind", str(ADAPTER), "/opt/megaflow-adapter/harbor_env.py",
        "--chdir", "/work",
        "--die-with-parent",
        "--clearenv",
        "--setenv", "PATH", "/opt/harbor/bin:/usr/bin:/bin",
        "--setenv", "HOME", "/work/home",
        "--setenv", "PYTHONPATH", "/opt/megaflow-adapter",
        "--setenv", "MEGAFLOW_OPENENV_URL", url,
        "--setenv", "COLUMNS", "200",
        "harbor", *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=540, check=False)


@pytest.mark.timeout(600)
def test_harbor_cli_runs_tasks_in_megaflow_sandboxes(
    harbor_root: Path, server: tuple[ServiceProcess, Path], tmp_path: Path
) -> None:
    proc, sandboxes = server
    work = tmp_path / "work"
    _write_tasks(work / "tasks")
    (work / "home").mkdir()
    run = _harbor(
        harbor_root,
        work,
        f"http://{proc.address}",
        "run",
        "--path", "/work/tasks",
        "--agent", "oracle",
        "--env", "harbor_env:MegaFlowEnvironment",
        "--n-concurrent", str(CONCURRENT),
        "--n-attempts", str(ATTEMPTS),
        "--jobs-dir", "/work/jobs",
        "--job-name", "megaflow",
        "--quiet",
        "--yes",
    )  # fmt: skip
    assert run.returncode == 0, f"harbor run failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    job = work / "jobs" / "megaflow"
    trials = sorted(p for p in job.iterdir() if (p / "result.json").is_file())
    assert len(trials) == len(TASKS) * ATTEMPTS, sorted(p.name for p in job.iterdir())
    got: dict[str, list[dict[str, float]]] = {}
    errors = []
    for trial in trials:
        result = json.loads((trial / "result.json").read_text())
        if result.get("exception_info") and result["task_name"] == "agent-timeout":
            assert result["exception_info"]["exception_type"] == "AgentTimeoutError", result
        elif result.get("exception_info"):
            info = result["exception_info"]
            tail = info.get("exception_traceback", "")[-1500:]
            errors.append(f"{trial.name}: {info.get('exception_type')}: {tail}")
        rewards = (result.get("verifier_result") or {}).get("rewards")
        got.setdefault(result["task_name"], []).append(rewards)
    assert not errors, "\n".join(errors)
    want = {name: [rewards] * ATTEMPTS for name, (_, rewards) in TASKS.items()}
    assert got == want
    # The verifier's folder came back whole (tar through base64 pieces).
    big = [t / "verifier" for t in trials if t.name.startswith("big-log")]
    assert len(big) == ATTEMPTS
    for verifier in big:
        assert (verifier / "big.txt").read_text() == "".join(f"{i}\n" for i in range(1, 200001))
        blob = (verifier / "random.bin").read_bytes()
        assert len(blob) == 9 * 1024 * 1024
        assert hashlib.sha256(blob).hexdigest() == (verifier / "random.sha256").read_text().strip()
    # Every trial's sandbox was released by the adapter's stop (the server still runs).
    assert len(live_sandboxes(sandboxes)) == 0, f"sandboxes left under {sandboxes}"


@pytest.mark.timeout(300)
def test_an_unreachable_server_is_a_trial_error_naming_it(
    harbor_root: Path, tmp_path: Path, unused_tcp_port: int
) -> None:
    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    files, _ = TASKS["hello"]
    for rel, content in files.items():
        path = work / "tasks/hello" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    url = f"http://127.0.0.1:{unused_tcp_port}"
    run = _harbor(
        harbor_root,
        work,
        url,
        "run",
        "--path", "/work/tasks",
        "--agent", "oracle",
        "--env", "harbor_env:MegaFlowEnvironment",
        "--jobs-dir", "/work/jobs",
        "--job-name", "unreachable",
        "--quiet",
        "--yes",
    )  # fmt: skip
    results = list((work / "jobs/unreachable").glob("*/result.json"))
    assert len(results) == 1, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    info = json.loads(results[0].read_text())["exception_info"]
    assert info is not None
    assert info["exception_type"] == "MegaFlowError", info
    assert f"cannot reach MegaFlow's OpenEnv server at {url}" in info["exception_message"], info
