"""`megaflow serve model --openai-listen HOST:PORT` from the command line, driven by the
official `openai` client: models, chats with tools, streaming; stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import psutil
import pytest
from typer.testing import CliRunner

from megaflow.agent import tools
from megaflow.cli.main import app
from megaflow.model.gateway import TASK_HEADER
from megaflow.model.openai_messages import tool_to_openai
from megaflow.tasks.swe_synth import generate_tasks
from megaflow.testing.processes import ServiceProcess

TASK = generate_tasks(1, seed=5)[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tools() -> list[dict[str, Any]]:
    return [tool_to_openai(s) for s in tools.tool_specs()]


def _opening() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You fix bugs."},
        {"role": "user", "content": TASK.problem_statement},
    ]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _listens(proc: psutil.Process, port: int) -> bool:
    try:
        connections = proc.net_connections("tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in connections)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def served() -> Iterator[tuple[ServiceProcess, int]]:
    port = _free_port()
    proc = ServiceProcess(
        "model", "--openai-listen", f"127.0.0.1:{port}", "--time-scale", "0", "--model", "simulated"
    ).start()
    try:
        yield proc, port
    finally:
        proc.stop()


@pytest.mark.integration
def test_the_cli_serves_the_openai_api(served: tuple[ServiceProcess, int]) -> None:
    proc, port = served
    base_url = f"http://127.0.0.1:{port}/v1"
    assert f"megaflow openai-gateway ready on {base_url}" in proc.output()
    client = openai.OpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        timeout=20,
        default_headers={TASK_HEADER: TASK.task_id},
    )
    assert [m.id for m in client.models.list().data] == ["simulated"]

    # a chat offering tools: the answer calls one; its result goes back
    messages = _opening()
    first = client.chat.completions.create(model="simulated", messages=messages, tools=_tools())
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls or []
    assert call.function.name == tools.BASH
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "def f(): ..."})
    second = client.chat.completions.create(model="simulated", messages=messages, tools=_tools())
    assert second.choices[0].message.tool_calls or second.choices[0].message.content

    # streaming: chunks add up to an answer that ends with a finish reason
    calls, finish = [], None
    for chunk in client.chat.completions.create(
        model="simulated", messages=_opening(), tools=_tools(), stream=True
    ):
        for choice in chunk.choices:
            calls.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls[0].function.name == tools.BASH

    # errors are OpenAI's: an unknown model is a 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=_opening())

    # the task's two calls are recorded (the streamed one too, under the same header)
    recorded = client.get(f"/megaflow/trajectories/{TASK.task_id}", cast_to=object)
    assert isinstance(recorded, dict) and len(recorded["turns"]) == 3
    client.close()

    assert proc.stop(grace_s=30) == 0  # SIGTERM by PID: a clean exit
    assert not _listening(port)


@pytest.mark.integration
async def test_several_gateway_workers_share_the_port() -> None:
    port = _free_port()
    proc = ServiceProcess(
        "model",
        "--openai-listen",
        f"127.0.0.1:{port}",
        "--gateway-workers",
        "2",
        "--time-scale",
        "0",
    ).start(timeout_s=60)
    try:
        main = psutil.Process(proc.pid)
        workers = main.children()  # the extra gateway process (and spawn's tracker)
        listening = [p.pid for p in (main, *workers) if _listens(p, port)]
        assert listening[:1] == [proc.pid] and len(listening) == 2, (
            listening,
            proc.output(),
        )
        body = {"model": "simulated", "messages": _opening()}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(20):  # new connections: the kernel spreads them over both
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                    assert r.status == 200, (await r.text(), proc.output())
                    assert (await r.json())["choices"][0]["message"]["role"] == "assistant"
    finally:
        code = proc.stop(grace_s=30)  # a loaded machine may take a while
    assert code == 0, proc.output()
    assert not [w.pid for w in workers if _alive(w)]  # the workers went with it
    assert not _listening(port)


@pytest.mark.integration
def test_gateway_workers_do_not_outlive_a_killed_service() -> None:
    port = _free_port()
    proc = ServiceProcess(
        "model", "--openai-listen", f"127.0.0.1:{port}", "--gateway-workers", "2"
    ).start(timeout_s=60)
    try:
        workers = psutil.Process(proc.pid).children()
        assert workers
        os.kill(proc.pid, signal.SIGKILL)  # the service alone: no SIGTERM, no group kill
        proc.proc.wait(10)  # type: ignore[union-attr]
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not [w.pid for w in alive if _alive(w)]
        assert not _listening(port)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--openai-listen", "8000"], "expected HOST:PORT"),
        (["--openai-listen", "127.0.0.1:port"], "expected HOST:PORT"),
        (["--gateway-workers", "2"], "needs --openai-listen"),
    ],
)
def test_bad_gateway_options_are_refused(args: list[str], complaint: str) -> None:
    result = CliRunner().invoke(app, ["serve", "model", *args])
    assert result.exit_code == 2
    assert complaint in re.sub(r"\s+", " ", result.output.replace("│", ""))
