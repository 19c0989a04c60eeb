"""The gateway benchmark's parts at tiny scale: its servers (bare and gateway, as
processes), its load generator (a process) in both modes, and the median round."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gateway_bench as gb
from megaflow.testing.processes import ServiceProcess

pytestmark = pytest.mark.integration


def test_the_load_generator_measures_a_bare_server_and_the_gateway(tmp_path: Path) -> None:
    gateway = ServiceProcess("gateway", "--workers", "1", module=gb.MODULE).start()
    try:
        url = f"http://{gateway.address}"
        answer = tmp_path / "answer.json"
        gb._capture_answer(url, answer)
        bare = ServiceProcess("bare", "--answer", str(answer), module=gb.MODULE).start()
        try:
            for server in (f"http://{bare.address}", url):
                figures = gb._rate(server, concurrency=4, warmup=0.2, duration=0.5)
                assert figures["rps"] > 0 and figures["errors"] == 0
                assert 0 < figures["p50"] <= figures["p99"]
        finally:
            bare.stop()
        many = gb._many_tasks(url, tasks=20, calls=2, loaders=2, bound_s=60)
        assert many["done"] == 20 and many["errors"] == 0
    finally:
        gateway.stop()


def test_the_median_round_is_reported() -> None:
    rounds = [{"rps": 3.0, "p99": 1.0}, {"rps": 1.0, "p99": 9.0}, {"rps": 2.0, "p99": 5.0}]
    assert gb._median_run(rounds) == {"rps": 2.0, "p99": 5.0}
