"""`megaflow serve openenv` driven by OpenEnv's own client (PyPI `openenv`, pinned,
unmodified): real local sandboxes, one per session, in a server process.

- 64 sessions at once (reset, a few steps, a state check), all holding a sandbox at
  the same moment; meanwhile one more session waits 60 s between two steps and finds
  its sandbox (a file it wrote) intact.
- Hidden-test rewards through `submit`; file actions; errors as OpenEnv error frames.
- OpenEnv's stateless HTTP API, its responses read with OpenEnv's own models.
- Idle sessions and dropped connections release their sandbox; none is left at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import websockets
from openenv.core import GenericEnvClient
from openenv.core.env_server.types import (
    HealthResponse,
    ResetResponse,
    SchemaResponse,
    State,
    StepResponse,
)

from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.integrations.openenv import OpenEnvConfig, OpenEnvServer
from megaflow.testing.processes import ServiceProcess, deployment, live_sandboxes, openenv_server

pytestmark = pytest.mark.integration

SESSIONS = 64
PAUSE_S = 60.0


async def _until_no_sandbox(root: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(live_sandboxes(root)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(live_sandboxes(root)) == 0, f"sandboxes left under {root}"


class Server:
    def __init__(self, proc: ServiceProcess, root: Path) -> None:
        self.proc, self.root = proc, root

    @property
    def url(self) -> str:
        return f"http://{self.proc.address}"

    def client(self) -> GenericEnvClient:
        # Creating 64 sandboxes at once on a small shared machine: a generous wait.
        return GenericEnvClient(base_url=self.url, message_timeout_s=180.0)


def _serve(tmp: Path, *args: str) -> Iterator[Server]:
    with openenv_server(tmp, *args) as proc:
        yield Server(proc, tmp / "sandboxes")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("openenv"), "--max-sessions", str(SESSIONS + 8))


@pytest.mark.timeout(420)
async def test_64_concurrent_sessions_and_one_kept_across_a_60s_pause(server: Server) -> None:
    all_reset = asyncio.Barrier(SESSIONS + 1)
    held: list[int] = []

    async def session(i: int) -> None:
        async with server.client() as env:
            first = await env.reset()
            assert first.done is False and first.observation["exit_code"] == 0
            await all_reset.wait()
            for n in range(3):
                result = await env.step({"command": f"echo s{i}-{n} > f{n}; cat f{n}"})
                assert result.observation["output"] == f"s{i}-{n}\n"
                assert result.observation["exit_code"] == 0 and result.done is False
            state = await env.state()
            assert state["step_count"] == 3 and state["alive"] is True
            assert state["last_output"] == f"s{i}-2\n"
            assert state["episode_id"] == first.metadata["episode_id"]

    async def paused() -> None:
        async with server.client() as env:
            await env.reset()
            await env.step({"write_file": {"path": "kept.txt", "content": "still here"}})
            started = time.monotonic()
            await asyncio.sleep(PAUSE_S)  # no message at all; keepalive pings only
            read = await env.step({"read_file": "kept.txt"})
            assert time.monotonic() - started >= PAUSE_S
            assert read.observation == {
                "ok": True,
                "message": "read 10 bytes",
                "content": "still here",
            }
            state = await env.state()
            assert state["step_count"] == 2 and state["alive"] is True

    long_one = asyncio.create_task(paused())

    async def count_when_all_reset() -> None:
        await all_reset.wait()
        held.append(len(live_sandboxes(server.root)))

    await asyncio.gather(count_when_all_reset(), *(session(i) for i in range(SESSIONS)))
    # Every session held its own sandbox at the same moment (and the paused one too).
    assert held == [SESSIONS + 1]
    await long_one
    await _until_no_sandbox(server.root)


async def test_submit_scores_with_the_hidden_tests(server: Server) -> None:
    task = {
        "files": {"answer.txt": "todo\n"},
        "hidden_files": {"check.sh": "grep -qx 42 answer.txt\n"},
        "eval_command": "sh check.sh",
    }
    async with server.client() as env:
        await env.reset(**task)
        edit = await env.step({"edit_file": {"path": "answer.txt", "old": "todo", "new": "42"}})
        assert edit.observation["ok"] is True
        hidden = await env.step({"command": "ls"})
        assert "check.sh" not in hidden.observation["output"]  # copied in at submit only
        scored = await env.step({"submit": True})
        assert scored.reward == 1.0 and scored.done is True
        assert scored.observation["message"] == "hidden tests passed"
        # A new episode in the same session: a fresh sandbox, the task as it comes.
        await env.reset(**task)
        unsolved = await env.step({"submit": True})
        assert unsolved.reward == 0.0 and unsolved.done is True
    await _until_no_sandbox(server.root)


async def test_bad_messages_are_error_frames_and_the_session_goes_on(server: Server) -> None:
    async with server.client() as env:
        await env.reset()
        with pytest.raises(RuntimeError, match="VALIDATION_ERROR"):
            await env.step({"command": "ls", "submit": True})  # two actions at once
        with pytest.raises(RuntimeError, match="VALIDATION_ERROR"):
            await env.reset(image=3)
        with pytest.raises(RuntimeError, match="EXECUTION_ERROR"):
            await env.step({"command": "true", "timeout_s": 10**9})  # past the service's limit
        outside = await env.step({"read_file": "missing.txt"})  # the agent's mistake
        assert outside.observation["ok"] is False and outside.observation["message"]
        ok = await env.step({"command": "echo fine"})
        assert ok.observation["output"] == "fine\n"
    await _until_no_sandbox(server.root)


async def test_http_api_is_openenv_s(server: Server) -> None:
    async with aiohttp.ClientSession(server.url) as http:
        async with http.get("/health") as r:
            assert HealthResponse.model_validate(await r.json()).status == "healthy"
        async with http.get("/schema") as r:
            schema = SchemaResponse.model_validate(await r.json())
            assert "command" in schema.action["properties"]
        async with http.post("/reset", json={"seed": 1}) as r:
            reset = ResetResponse.model_validate(await r.json())
            assert reset.done is False and reset.observation["cwd"]
        async with http.post("/step", json={"action": {"command": "echo one-shot"}}) as r:
            step = StepResponse.model_validate(await r.json())
            assert step.observation["output"] == "one-shot\n"
        async with http.post("/step", json={"action": {"nothing": 1}}) as r:
            assert r.status == 422
        async with http.get("/state") as r:
            assert State.model_validate(await r.json()).step_count == 0
    await _until_no_sandbox(server.root)


async def test_a_dropped_connection_releases_its_sandbox(server: Server) -> None:
    ws_url = server.url.replace("http://", "ws://") + "/ws"
    async with websockets.connect(ws_url) as ws:
        await ws.send('{"type": "reset", "data": {}}')
        assert '"observation"' in await ws.recv()
        assert len(live_sandboxes(server.root)) == 1
        ws.transport.abort()  # no close message, no close frame
    await _until_no_sandbox(server.root)


@pytest.fixture
def idle_server(tmp_path: Path) -> Iterator[Server]:
    yield from _serve(tmp_path, "--idle-timeout", "1")


async def test_an_idle_session_is_released_and_told_so(idle_server: Server) -> None:
    async with idle_server.client() as env:
        await env.reset()
        assert len(live_sandboxes(idle_server.root)) == 1
        await _until_no_sandbox(idle_server.root, timeout_s=15.0)
        # OpenEnv's client reconnects on its own: a new session, which has no sandbox
        # until its reset (never a silent fresh one in place of the lost state).
        with pytest.raises(RuntimeError, match="send reset first"):
            await env.step({"command": "echo late"})
        assert (await env.reset()).done is False
        assert (await env.step({"command": "echo again"})).observation["output"] == "again\n"
    await _until_no_sandbox(idle_server.root)


async def test_leases_are_renewed_while_a_session_waits(tmp_path: Path) -> None:
    """In process: a lease of 1.5 s reaped every 0.2 s; the session waits 4 s between
    steps and keeps its sandbox, because the server heartbeats its lease."""
    root = tmp_path / "sandboxes"
    service = SandboxEnvironmentService(EnvServiceConfig(root_dir=root, reap_interval_s=0.2))
    config = OpenEnvConfig(lease_s=1.5)
    async with service, OpenEnvServer(service, config) as openenv:
        async with GenericEnvClient(base_url=openenv.base_url) as env:
            await env.reset()
            await env.step({"command": "echo kept > kept.txt"})
            await asyncio.sleep(4.0)
            kept = await env.step({"command": "cat kept.txt"})
            assert kept.observation["output"] == "kept\n"
            assert service.live == 1
        await _until_no_sandbox(root)
    assert service.live == 0


async def test_through_a_remote_environment_service(tmp_path: Path) -> None:
    """`serve openenv --env ADDR`: the sandboxes are an Environment Service's, over gRPC."""
    root = tmp_path / "sandboxes"
    with deployment(str(tmp_path / "ledger.sqlite"), env=["--sandbox-dir", str(root)]) as procs:
        proxy = ServiceProcess("openenv", "--listen", "127.0.0.1:0", "--env", procs["env"].address)
        proxy.start(timeout_s=60.0)
        try:
            server = Server(proxy, root)

            async def session(i: int) -> None:
                async with server.client() as env:
                    await env.reset()
                    out = await env.step({"command": f"echo remote-{i}"})
                    assert out.observation["output"] == f"remote-{i}\n"
                    assert (await env.state())["step_count"] == 1

            await asyncio.gather(*(session(i) for i in range(8)))
            await _until_no_sandbox(root)
        finally:
            assert proxy.stop() == 0, proxy.output()


async def test_keepalive_pings_are_answered_while_a_step_runs(tmp_path: Path) -> None:
    """Pings every second both ways across a 5 s step: the socket stays up, because the
    server reads (and pongs) while the step runs."""
    service = SandboxEnvironmentService(EnvServiceConfig(root_dir=tmp_path / "sandboxes"))
    config = OpenEnvConfig(ws_heartbeat_s=1.0)
    async with service, OpenEnvServer(service, config) as openenv:
        client = GenericEnvClient(
            base_url=openenv.base_url, websocket_ping_interval_s=1.0, websocket_ping_timeout_s=2.0
        )
        async with client as env:
            await env.reset()
            slow = await env.step({"command": "sleep 5; echo done", "timeout_s": 30})
            assert slow.observation["output"] == "done\n"
            after = await env.step({"command": "echo same session"})
            assert after.observation["output"] == "same session\n"
            assert (await env.state())["step_count"] == 2
    assert service.live == 0
