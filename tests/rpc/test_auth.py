"""The control plane's credentials over real gRPC on loopback: a shared token checked on
every RPC, mutual TLS, and the rule that a non-loopback bind needs one of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import AuthenticationError, InvalidRequestError, MegaFlowError
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc import auth
from megaflow.rpc.clients import ModelServiceClient, SchedulerServiceClient
from megaflow.rpc.resolver import ServiceResolver
from megaflow.rpc.server import GrpcServer
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, scheduler_pb2
from tests.rpc.pki import Pki, make_pki

TOKEN = "t0ken-of-this-deployment-0123456789"
HEALTH = common_pb2.HealthRequest()


@pytest.fixture
async def model() -> AsyncIterator[ModelServiceImpl]:
    impl = ModelServiceImpl([SimulatedBackend.fast(success_rate=1.0)])
    await impl.start()
    yield impl
    await impl.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, name: str, token: str = "") -> auth.RpcSecurity:
    return auth.RpcSecurity(
        token=token,
        tls_cert=pki.cert(name).read_bytes(),
        tls_key=pki.key(name).read_bytes(),
        tls_ca=pki.ca.read_bytes(),
    )


async def _health(address: str, security: auth.RpcSecurity) -> common_pb2.HealthResponse:
    client = ModelServiceClient(address, timeout_s=10.0, security=security)
    try:
        return await client.health(HEALTH)
    finally:
        await client.close()


async def test_a_token_is_checked_on_every_call(model: ModelServiceImpl) -> None:
    server_side = auth.RpcSecurity(token=TOKEN)
    async with GrpcServer("127.0.0.1:0", {"model": model}, security=server_side) as server:
        assert (await _health(server.address, auth.RpcSecurity(token=TOKEN))).ok
        with pytest.raises(AuthenticationError, match="carried none"):
            await _health(server.address, auth.RpcSecurity())
        with pytest.raises(AuthenticationError, match="token is wrong"):
            await _health(server.address, auth.RpcSecurity(token=TOKEN[:-1] + "X"))
        assert (await _health(server.address, auth.RpcSecurity(token=TOKEN))).ok  # serving


async def test_a_refused_stream_raises_at_once_and_does_not_reconnect(tmp_path: Path) -> None:
    """WatchEvents (a stream the client reconnects for minutes) is refused once, clearly."""
    impl = SchedulerServiceImpl(SqliteLedger(tmp_path / "l.sqlite"), ServiceResolver())
    await impl.start()
    try:
        server_side = auth.RpcSecurity(token=TOKEN)
        async with GrpcServer("127.0.0.1:0", {"scheduler": impl}, security=server_side) as s:
            client = SchedulerServiceClient(s.address, security=auth.RpcSecurity(token="w" * 20))
            try:
                with pytest.raises(AuthenticationError, match="token is wrong"):
                    async for _ in client.watch_events(
                        scheduler_pb2.WatchEventsRequest(run_id="r"), reconnect_for_s=300.0
                    ):
                        pass
                with pytest.raises(AuthenticationError):
                    await client.submit_tasks(scheduler_pb2.SubmitTasksRequest())
            finally:
                await client.close()
    finally:
        await impl.stop()


async def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_one_without(
    model: ModelServiceImpl, pki: Pki, tmp_path: Path
) -> None:
    server_side = _tls(pki, "server")
    async with GrpcServer("127.0.0.1:0", {"model": model}, security=server_side) as server:
        assert (await _health(server.address, _tls(pki, "client"))).ok
        with pytest.raises(MegaFlowError, match="TLS"):  # a plain client: no certificate
            await _health(server.address, auth.RpcSecurity())
        other = make_pki(tmp_path / "other", ca="other-ca")  # a certificate of another CA
        with pytest.raises(MegaFlowError):
            await _health(server.address, _tls(other, "client"))
        assert (await _health(server.address, _tls(pki, "client"))).ok


async def test_tls_and_token_together_need_both(model: ModelServiceImpl, pki: Pki) -> None:
    server_side = _tls(pki, "server", token=TOKEN)
    async with GrpcServer("127.0.0.1:0", {"model": model}, security=server_side) as server:
        assert (await _health(server.address, _tls(pki, "client", token=TOKEN))).ok
        with pytest.raises(AuthenticationError, match="carried none"):
            await _health(server.address, _tls(pki, "client"))


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", ":0", "example.com:0"])
async def test_a_non_loopback_bind_needs_credentials(model: ModelServiceImpl, listen: str) -> None:
    with pytest.raises(InvalidRequestError, match="without authentication"):
        await GrpcServer(listen, {"model": model}, security=auth.RpcSecurity()).start()


@pytest.mark.parametrize(
    "security", [auth.RpcSecurity(token=TOKEN), auth.RpcSecurity(insecure=True)]
)
async def test_a_non_loopback_bind_with_a_token_or_insecure_starts(
    model: ModelServiceImpl, security: auth.RpcSecurity
) -> None:
    async with GrpcServer("0.0.0.0:0", {"model": model}, security=security) as server:
        assert server.port > 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert auth.is_loopback(host)
    auth.RpcSecurity().check_bind(f"{host}:7070")


def test_a_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    with pytest.raises(InvalidRequestError, match="chmod 600"):
        auth.load(token_file=path, environ={})
    path.chmod(0o600)
    assert auth.load(token_file=path, environ={}).token == TOKEN


def test_settings_come_from_the_environment(tmp_path: Path, pki: Pki) -> None:
    assert auth.load(environ={auth.ENV_TOKEN: TOKEN}).token == TOKEN
    environ = {
        auth.ENV_TLS_CERT: str(pki.cert("client")),
        auth.ENV_TLS_KEY: str(pki.key("client")),
        auth.ENV_TLS_CA: str(pki.ca),
    }
    assert auth.load(environ=environ).tls


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": "short"}, "at least 16"),
        ({"tls_cert": b"x"}, "all three"),
        ({"tls_cert": b"x", "tls_key": b"y"}, "all three"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        auth.RpcSecurity(**kwargs)  # type: ignore[arg-type]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot read the auth token file"):
        auth.load(token_file=tmp_path / "nope", environ={})


def test_the_process_default_follows_the_environment_until_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(auth.ENV_TOKEN, raising=False)
    monkeypatch.delenv(auth.ENV_TOKEN_FILE, raising=False)
    assert auth.current().token == ""
    monkeypatch.setenv(auth.ENV_TOKEN, TOKEN)
    assert auth.current().token == TOKEN
    try:
        auth.configure(auth.RpcSecurity(token="c" * 20))
        assert auth.current().token == "c" * 20
    finally:
        auth.configure(None)
    assert auth.current().token == TOKEN
