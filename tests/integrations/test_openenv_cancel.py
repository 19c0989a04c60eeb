"""The OpenEnv server's ``cancel`` message (MegaFlow's extension, used by the Harbor
adapter when Harbor gives up on a command): it stops the step in flight, which is
answered with a ``CANCELLED`` error frame; the session and its sandbox go on."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import websockets

from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.integrations.openenv import OpenEnvServer

pytestmark = pytest.mark.integration


async def test_cancel_stops_the_step_in_flight_and_the_session_goes_on(tmp_path: Path) -> None:
    service = SandboxEnvironmentService(EnvServiceConfig(root_dir=tmp_path / "sandboxes"))
    async with service, OpenEnvServer(service) as openenv:
        async with websockets.connect(openenv.base_url.replace("http", "ws") + "/ws") as ws:
            await ws.send(json.dumps({"type": "reset", "data": {}}))
            assert json.loads(await ws.recv())["type"] == "observation"
            # Nothing in flight: ignored, and never answered.
            await ws.send(json.dumps({"type": "cancel"}))
            step = {"command": "echo a > a.txt; sleep 60; echo b > b.txt", "timeout_s": 120}
            await ws.send(json.dumps({"type": "step", "data": step}))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await ws.send(json.dumps({"type": "cancel"}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert frame["type"] == "error" and frame["data"]["code"] == "CANCELLED", frame
            assert time.monotonic() - started < 20
            check = {"command": "cat a.txt; ls b.txt 2>&1; pgrep -x sleep || echo no sleep"}
            await ws.send(json.dumps({"type": "step", "data": check}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
            output = frame["data"]["observation"]["output"]
            assert output.startswith("a\n") and "No such file" in output, output
            assert output.endswith("no sleep\n"), output
        await asyncio.sleep(0)
    assert service.live == 0
