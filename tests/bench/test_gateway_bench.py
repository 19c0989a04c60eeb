"""The gateway benchmark's parts at tiny scale: its servers (bare and gateway, as
processes), its load generator (a process) in both modes, and the median round."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
            for server, pid in ((f"http://{bare.address}", bare.pid), (url, gateway.pid)):
                figures = gb._rate(server, concurrency=4, warmup=0.2, duration=0.5, server_pid=pid)
                assert figures["rps"] > 0 and figures["errors"] == 0
                assert 0 < figures["p50"] <= figures["p99"]
                # the server's own CPU time per answered request, from /proc
                assert 0 < figures["cpu_us"] < 1e6
        finally:
            bare.stop()
        many = gb._many_tasks(url, tasks=20, calls=2, loaders=2, bound_s=60)
        assert many["done"] == 20 and many["errors"] == 0
    finally:
        gateway.stop()


def test_server_cpu_counts_the_process_and_its_children() -> None:
    """A busy child's CPU shows in its parent's figure (gateway workers are children)."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = gb._cpu_s(os.getpid())
        deadline = time.monotonic() + 30
        while gb._cpu_s(os.getpid()) - before < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gb._cpu_s(os.getpid()) - before >= 0.2
        assert gb._median_cpu([{"cpu_us": 5.0}, {"cpu_us": 1.0}, {"cpu_us": 3.0}]) == 3.0
    finally:
        child.kill()
        child.wait()


def test_the_median_round_is_reported() -> None:
    rounds = [{"rps": 3.0, "p99": 1.0}, {"rps": 1.0, "p99": 9.0}, {"rps": 2.0, "p99": 5.0}]
    assert gb._median_run(rounds) == {"rps": 2.0, "p99": 5.0}


async def test_the_streaming_figures_are_measured() -> None:
    figures = await gb._streaming(calls=4, concurrency=2)
    assert figures["content_chunks_p50"] > 1  # the answer came in pieces
    assert 0 < figures["first_chunk_p50"] and 0 < figures["streamed_whole_p50"]
    assert figures["plain_whole_p50"] > 0
