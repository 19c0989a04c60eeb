"""A multi-process deployment (`megaflow serve` scheduler, model, env, agent over gRPC on
loopback) with a shared token or mutual TLS: it runs tasks end to end for a client with
the credentials; a client or service without them (or with wrong ones) is refused with
a clear error, at once; a non-loopback bind without credentials is refused at start."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from megaflow.testing.processes import ServiceProcess, live_sandboxes
from tests.rpc.pki import Pki, make_pki

pytestmark = pytest.mark.integration

TOKEN = "deployment-token-0123456789abcdef"


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megaflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _said(done: subprocess.CompletedProcess[str]) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(done.stderr.split())


def _token_file(path: Path, token: str) -> str:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def _deploy(tmp: Path, creds: dict[str, Sequence[str]]) -> dict[str, ServiceProcess]:
    """scheduler, model, env and agent, each with its own credentials `creds[name]`."""
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["scheduler"] = ServiceProcess(
            "scheduler", "--listen", "127.0.0.1:0", "--store", str(tmp / "ledger.sqlite"),
            *creds["scheduler"],
        ).start()  # fmt: skip
        sched = procs["scheduler"].address
        procs["model"] = ServiceProcess(
            "model", "--scheduler", sched, "--time-scale", "0.05", *creds["model"]
        ).start()
        procs["env"] = ServiceProcess(
            "env", "--scheduler", sched, "--sandbox-dir", str(tmp / "sandboxes"),
            "--capacity", "4", *creds["env"],
        ).start()  # fmt: skip
        procs["agent"] = ServiceProcess("agent", "--scheduler", sched, *creds["agent"]).start()
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs: dict[str, ServiceProcess]) -> None:
    for proc in reversed(list(procs.values())):
        proc.stop()


def _run_ok(sched: str, out: Path, creds: Sequence[str], tasks: int) -> None:
    run = _cli("run", "--scheduler", sched, "--tasks", str(tasks), "--out", str(out), *creds)
    assert run.returncode == 0, run.stdout + run.stderr
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == tasks and all(r["status"] == "succeeded" for r in results), results


def test_a_token_deployment_runs_tasks_and_refuses_callers_without_the_token(
    tmp_path: Path,
) -> None:
    creds = ["--auth-token-file", _token_file(tmp_path / "token", TOKEN)]
    wrong = ["--auth-token-file", _token_file(tmp_path / "wrong", "x" * 32)]
    shapes = dict.fromkeys(("scheduler", "model", "env", "agent"), creds)
    # the env host as on a cluster: every address, reached at the one it advertises
    shapes["env"] = [*creds, "--listen", "0.0.0.0:0", "--advertise", "127.0.0.1"]
    procs = _deploy(tmp_path, shapes)
    try:
        assert procs["env"].address.startswith("127.0.0.1:")
        sched = procs["scheduler"].address
        _run_ok(sched, tmp_path / "out", creds, tasks=4)
        # a client without the token: one clear error, exit 2, no task submitted
        bare = _cli("run", "--scheduler", sched, "--tasks", "1", "--out", str(tmp_path / "o2"))
        assert bare.returncode == 2, bare.stdout + bare.stderr
        assert "requires an auth token and the call carried none" in _said(bare)
        bad = _cli("status", "--scheduler", sched, *wrong, timeout=60)
        assert bad.returncode == 2 and "auth token is wrong" in _said(bad), bad.stderr
        # a service with a wrong token cannot join: it stops with the reason (no retry loop)
        intruder = ServiceProcess("agent", "--scheduler", sched, *wrong).start()
        code = intruder.proc.wait(60) if intruder.proc else None
        assert code == 2, intruder.output()
        assert "cannot register with scheduler" in intruder.output()
        assert "auth token is wrong" in intruder.output()
        intruder.stop()
        status = _cli("status", "--scheduler", sched, *creds, timeout=60)
        assert status.returncode == 0, status.stderr  # still serving
    finally:
        _stop(procs)
    assert not live_sandboxes(tmp_path / "sandboxes")


def test_a_mutual_tls_deployment_runs_tasks_and_refuses_a_client_without_a_certificate(
    tmp_path: Path,
) -> None:
    pki: Pki = make_pki(tmp_path / "pki", names=("host", "client"))
    procs = _deploy(
        tmp_path, dict.fromkeys(("scheduler", "model", "env", "agent"), pki.args("host"))
    )
    try:
        sched = procs["scheduler"].address
        _run_ok(sched, tmp_path / "out", pki.args("client"), tasks=2)
        bare = _cli("status", "--scheduler", sched, timeout=60)
        assert bare.returncode == 2, bare.stderr
        assert "TLS" in _said(bare)  # the hint names what is missing
        status = _cli("status", "--scheduler", sched, *pki.args("client"), timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        _stop(procs)
    assert not live_sandboxes(tmp_path / "sandboxes")


@pytest.mark.parametrize(
    "argv",
    [
        ["scheduler", "--listen", "0.0.0.0:0"],
        ["model", "--listen", "0.0.0.0:0"],
        ["model", "--openai-listen", "0.0.0.0:0"],
        ["openenv", "--listen", "0.0.0.0:0"],
    ],
)
def test_a_non_loopback_bind_without_credentials_is_refused_at_start(
    tmp_path: Path, argv: list[str]
) -> None:
    done = _cli("serve", *argv, "--log-level", "warning", timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing" in _said(done) and "--insecure" in _said(done), done.stderr


def test_insecure_or_a_token_allows_a_non_loopback_bind(tmp_path: Path) -> None:
    token = _token_file(tmp_path / "token", TOKEN)
    for extra in (["--insecure"], ["--auth-token-file", token]):
        proc = ServiceProcess(
            "scheduler", "--listen", "0.0.0.0:0", "--store", str(tmp_path / "l.sqlite"), *extra
        ).start()
        assert proc.address.startswith("0.0.0.0:")
        assert proc.stop() == 0


@pytest.mark.parametrize(
    ("advertise", "expected"),
    [
        ("10.0.0.2", "10.0.0.2:7072"),
        ("10.0.0.2:0", "10.0.0.2:7072"),
        ("host1.example:9000", "host1.example:9000"),
        ("[fd00::2]", "[fd00::2]:7072"),
        ("[fd00::2]:9000", "[fd00::2]:9000"),
    ],
)
def test_the_advertised_address_takes_the_listening_port_when_it_names_none(
    advertise: str, expected: str
) -> None:
    from megaflow.deploy.processes import _advertised

    assert _advertised(advertise, 7072) == expected
