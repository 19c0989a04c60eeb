"""The control plane from inside a sandbox: no MegaFlow service port (gRPC, bound to
loopback or to every address, with a token), no store server (Redis, etcd) and no model
gateway is reachable at the host's loopback or global addresses, on every backend; and
the services' auth token (an environment variable of the service) is not visible inside.
The host reaches every one of them, so each is really listening."""

from __future__ import annotations

import contextlib
import json
import secrets
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from megaflow.model.gateway import Gateway
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.auth import ENV_TOKEN, RpcSecurity
from megaflow.rpc.server import GrpcServer
from megaflow.testing.etcd_server import EtcdServer, etcd_available
from megaflow.testing.redis_server import RedisServer, redis_available
from megaflow.testing.simulated_model import SimulatedBackend
from tests.security.backends import env_request
from tests.security.conftest import Arena, host_global_ipv4

pytestmark = pytest.mark.integration

# One step tries every target and prints what it reached (nothing, it must be).
PROBE = (
    "python3 -c 'import json,socket,sys\n"
    "reached = []\n"
    "for host, port in json.loads(sys.argv[1]):\n"
    "    try:\n"
    "        socket.create_connection((host, port), timeout=2).close()\n"
    '        reached.append(f"{host}:{port}")\n'
    "    except OSError:\n"
    "        pass\n"
    'print("REACHED", reached)\''
)


@contextlib.contextmanager
def _stores(tmp: Path) -> Iterator[dict[str, int]]:
    """A private Redis and etcd server (each skipped where not installed) -> port."""
    ports: dict[str, int] = {}
    servers: list[RedisServer | EtcdServer] = []
    try:
        if redis_available() is None:
            servers.append(RedisServer(tmp).start())
            ports["redis"] = servers[-1].port
        if etcd_available() is None:
            servers.append(EtcdServer(tmp).start())
            ports["etcd"] = servers[-1].port
        yield ports
    finally:
        for server in servers:
            server.stop()


async def test_no_service_store_or_gateway_port_is_reachable_from_a_sandbox(
    arena: Arena, tmp_path: Path
) -> None:
    if redis_available() is not None or etcd_available() is not None:
        pytest.skip(f"{redis_available() or etcd_available()}")
    security = RpcSecurity(token=secrets.token_hex(16))
    model = ModelServiceImpl([SimulatedBackend.fast(success_rate=1.0)])
    await model.start()
    try:
        async with (
            GrpcServer("0.0.0.0:0", {"env": arena.service}, security=security) as on_all,
            GrpcServer("127.0.0.1:0", {"model": model}, security=security) as on_lo,
            Gateway(model, host="127.0.0.1", port=0) as gateway,
        ):
            with _stores(tmp_path) as stores:
                ports = {"env gRPC": on_all.port, "model gRPC": on_lo.port,
                         "gateway": gateway.port, **stores}  # fmt: skip
                for port in ports.values():  # they listen: the host reaches each
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                hosts = ["127.0.0.1", *host_global_ipv4()]
                targets = [[host, port] for host in hosts for port in ports.values()]
                r = await arena.step(PROBE + " " + shlex.quote(json.dumps(targets)))
                assert r.exit_code == 0 and "REACHED []" in r.output, (ports, r.output)
    finally:
        await model.stop()
    await arena.assert_contained()


async def test_the_services_auth_token_is_not_visible_in_a_sandbox(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = f"megaflow-token-{secrets.token_hex(12)}"
    monkeypatch.setenv(ENV_TOKEN, token)  # as `megaflow serve env` would have it
    created = await arena.service.create_environment(
        env_request(arena.backend, owner="token-probe")
    )
    try:
        r = await arena.step(
            "env; cat /proc/self/environ /proc/1/environ 2>/dev/null | tr '\\0' '\\n'",
            env_id=created.env_id,
        )
        assert token not in r.output and ENV_TOKEN not in r.output, r.output
    finally:
        from megaflow.v1 import env_pb2

        await arena.service.release_environment(
            env_pb2.ReleaseEnvironmentRequest(env_id=created.env_id)
        )
    await arena.assert_contained()
