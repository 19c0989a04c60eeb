"""Malformed, oversized and out-of-order RPCs against each real service over loopback gRPC.

Requests are built with hypothesis from the protobuf descriptors (`protostrategies`):
random field values, raw bytes, truncated and padded messages, and calls out of order
(a step, action, snapshot or release on an environment that is unknown or already
released). Every call must end with a clear status, never UNKNOWN or INTERNAL (a bug
in a handler); the service must answer a real call after every batch; and nothing may
be left behind (no sandbox, no environment held). `MEGAFLOW_FUZZ_CASES` (default 5,000)
is the number of calls per service; the seed is fixed (derandomize) so a run is
reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megaflow.agent.service import AgentServiceImpl
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.resolver import ServiceResolver
from megaflow.rpc.server import MAX_MESSAGE_BYTES, SERVICES, GrpcServer
from megaflow.scheduler.service import SchedulerServiceImpl
from megaflow.store.sqlite import SqliteLedger
from megaflow.testing.processes import live_sandboxes
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, env_pb2, model_pb2, scheduler_pb2
from tests.fuzz.protostrategies import messages

pytestmark = pytest.mark.integration

CASES = int(os.environ.get("MEGAFLOW_FUZZ_CASES", "5000"))
PER_EXAMPLE = 25
UNCLEAR = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}
DEAD = "127.0.0.1:1"  # nobody listens: a call there is refused at once
ADDRESSES = st.sampled_from(["", DEAD, "[::1]:1", "not an address", "unix:/nonexistent"])
OVERRIDES = {
    ("megaflow.v1.RunTaskRequest", "env_address"): ADDRESSES,
    ("megaflow.v1.RunTaskRequest", "model_address"): ADDRESSES,
    ("megaflow.v1.RegisterServiceRequest", "address"): ADDRESSES,
    # a command that could run for long is not what this finds: keep them short
    ("megaflow.v1.ExecuteStepRequest", "command"): st.sampled_from(
        ["true", "echo x", "", "exit 3", "\x00"]
    ),
    ("megaflow.v1.ExecuteStepRequest", "timeout_s"): st.sampled_from(
        [0.0, -1.0, 2.0, math.nan, math.inf]
    ),
    ("megaflow.v1.CreateEnvironmentRequest", "setup_commands"): st.sampled_from(
        ["true", "", "exit 1"]
    ),
    ("megaflow.v1.CreateEnvironmentRequest", "setup_timeout_s"): st.sampled_from(
        [0.0, -1.0, 5.0, math.nan, math.inf]
    ),
    # a real sandbox per valid create: mostly images that do not exist (a clear error)
    ("megaflow.v1.CreateEnvironmentRequest", "image"): st.sampled_from(
        ["no-such-image", "", "host", "\x00", "dir:/nonexistent", "docker://x", "../..", "a" * 300]
    ),
    ("megaflow.v1.WorkspaceSource", "url"): st.sampled_from(["", "file:///nonexistent", "x"]),
}


@dataclass
class Target:
    """One service on a real gRPC server, with a raw channel (bytes in, bytes out)."""

    kind: str
    address: str
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel
    health: Callable[[], Any]
    codes: Counter[str] = field(default_factory=Counter)
    known_ids: list[str] = field(default_factory=list)  # env ids / run ids seen
    created: int = 0  # environments created
    live_ids: set[str] = field(default_factory=set)
    calls: int = 0

    def methods(self) -> list[MethodDescriptor]:
        return list(SERVICES[self.kind].methods)

    def path(self, method: MethodDescriptor) -> str:
        return f"/{SERVICES[self.kind].full_name}/{method.name}"

    async def call(
        self, method: MethodDescriptor, payload: bytes, deadline_s: float
    ) -> bytes | None:
        self.calls += 1
        try:
            if method.server_streaming:
                stream = self.channel.unary_stream(self.path(method))(payload, timeout=deadline_s)
                async for _ in stream:
                    pass
                self.codes["OK"] += 1
                return None
            reply: bytes = await self.channel.unary_unary(self.path(method))(
                payload, timeout=deadline_s
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self.codes[code.name] += 1
            assert code not in UNCLEAR, (
                f"{method.name} answered {code.name}: {error.details()} (request {payload!r:.300})"
            )
            return None
        self.codes["OK"] += 1
        return reply


def _run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {}


def _messages(method: MethodDescriptor) -> st.SearchStrategy[Any]:
    if method.full_name not in _STRATEGIES:
        _STRATEGIES[method.full_name] = messages(method.input_type, overrides=OVERRIDES)
    return _STRATEGIES[method.full_name]


def _payload(data: st.DataObject, target: Target, method: MethodDescriptor) -> bytes:
    msg = data.draw(_messages(method))
    fields = method.input_type.fields_by_name
    for name in ("env_id", "run_id"):  # out of order: ids that exist, or existed
        # (drawn the same way whatever ids exist: hypothesis replays draws)
        pick = data.draw(st.integers(-8, 7)) if name in fields else -1
        if pick >= 0 and target.known_ids:
            setattr(msg, name, target.known_ids[-1 - pick % len(target.known_ids)])
    if method.name == "CreateEnvironment" and data.draw(st.integers(0, 7)) == 0:
        msg = env_pb2.CreateEnvironmentRequest(owner="fuzz", image="host", lease_s=60.0)
    good = msg.SerializeToString()
    # every draw below has fixed bounds: `good` may depend on the ids seen so far
    form = data.draw(st.sampled_from(["message"] * 5 + ["raw", "padded", "truncated"]))
    if form == "raw":
        return data.draw(st.binary(max_size=256))
    if form == "padded":
        return good + data.draw(st.binary(min_size=1, max_size=32))
    if form == "truncated":
        cut = data.draw(st.integers(0, 2**16))
        return good[: 1 + cut % (len(good) - 1)] if len(good) > 1 else good
    return good


async def _batch(target: Target, batch: list[tuple[MethodDescriptor, bytes]]) -> None:
    for method, payload in batch:
        timeout = 0.3 if method.server_streaming else 20.0
        reply = await target.call(method, payload, timeout)
        if reply is not None and method.name == "CreateEnvironment":
            env_id = env_pb2.CreateEnvironmentResponse.FromString(reply).env_id
            target.known_ids.append(env_id)
            target.live_ids.add(env_id)
            target.created += 1
        if reply is not None and method.name == "SubmitTasks":
            target.known_ids.append(scheduler_pb2.SubmitTasksResponse.FromString(reply).run_id)
    for env_id in sorted(target.live_ids):  # what the batch created, released
        release = env_pb2.ReleaseEnvironmentRequest(env_id=env_id).SerializeToString()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await target.channel.unary_unary(f"/{SERVICES['env'].full_name}/ReleaseEnvironment")(
                release, timeout=30.0
            )
    target.live_ids.clear()
    await target.health()  # still serving


def fuzz(target: Target, cases: int = CASES) -> float:
    """`cases` calls (in batches of PER_EXAMPLE) of random methods; returns the seconds."""
    methods = target.methods()

    @settings(
        max_examples=math.ceil(cases / PER_EXAMPLE),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(st.data())
    def one(data: st.DataObject) -> None:
        batch = []
        for _ in range(PER_EXAMPLE):
            method = data.draw(st.sampled_from(methods))
            batch.append((method, _payload(data, target, method)))
        _run(target.loop, _batch(target, batch))

    started = time.monotonic()
    one()
    return time.monotonic() - started


@contextlib.contextmanager
def serving(kind: str, impl: Any) -> Iterator[Target]:
    """`impl` started and served on a loopback port, with a raw channel to it."""
    loop = asyncio.new_event_loop()
    server = GrpcServer("127.0.0.1:0", {kind: impl})
    channel: grpc.aio.Channel | None = None

    async def start() -> grpc.aio.Channel:
        if hasattr(impl, "start"):
            await impl.start()
        await server.start()
        return grpc.aio.insecure_channel(
            server.address,
            options=[
                ("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES),
            ],
        )

    async def health() -> None:
        assert channel is not None
        if kind == "scheduler":
            await channel.unary_unary(f"/{SERVICES[kind].full_name}/Status")(
                scheduler_pb2.StatusRequest().SerializeToString(), timeout=20.0
            )
            return
        reply = await channel.unary_unary(f"/{SERVICES[kind].full_name}/Health")(
            common_pb2.HealthRequest().SerializeToString(), timeout=20.0
        )
        assert common_pb2.HealthResponse.FromString(reply).ok

    try:
        channel = _run(loop, start())
        yield Target(kind, server.address, loop, channel, health)
    finally:
        if channel is not None:
            _run(loop, channel.close())
        _run(loop, server.stop(1.0))
        if hasattr(impl, "stop"):
            _run(loop, impl.stop())
        loop.close()


def _report(target: Target, seconds: float) -> None:
    created = f", {target.created} environments created" if target.kind == "env" else ""
    print(
        f"\n{target.kind}: {target.calls} calls in {seconds:.1f} s{created}: {dict(target.codes)}"
    )


def test_fuzz_model_service() -> None:
    impl = ModelServiceImpl([SimulatedBackend.fast(success_rate=1.0)])
    with serving("model", impl) as target:
        _report(target, fuzz(target))
        assert target.calls >= CASES


def test_fuzz_environment_service(tmp_path: Path) -> None:
    root = tmp_path / "sandboxes"
    impl = SandboxEnvironmentService(EnvServiceConfig(root_dir=root, max_environments=2))
    with serving("env", impl) as target:
        _report(target, fuzz(target))
        assert target.calls >= CASES
        assert impl.live == 0, "environments left after every one was released"
    assert not live_sandboxes(root), "sandboxes left after the service stopped"


def test_fuzz_agent_service() -> None:
    resolver = ServiceResolver()
    impl = AgentServiceImpl(resolver, capacity=64)
    with serving("agent", impl) as target:
        _report(target, fuzz(target))
        assert target.calls >= CASES
    asyncio.run(resolver.close())


def test_fuzz_scheduler_service(tmp_path: Path) -> None:
    impl = SchedulerServiceImpl(SqliteLedger(tmp_path / "ledger.sqlite"), ServiceResolver())
    with serving("scheduler", impl) as target:
        _report(target, fuzz(target))
        assert target.calls >= CASES


@pytest.mark.parametrize("kind", ["model", "env", "agent", "scheduler"])
def test_an_oversized_request_is_refused_and_the_service_keeps_serving(
    kind: str, tmp_path: Path
) -> None:
    impls: dict[str, Callable[[], Any]] = {
        "model": lambda: ModelServiceImpl([SimulatedBackend.fast(success_rate=1.0)]),
        "env": lambda: SandboxEnvironmentService(EnvServiceConfig(root_dir=tmp_path / "sb")),
        "agent": lambda: AgentServiceImpl(ServiceResolver()),
        "scheduler": lambda: SchedulerServiceImpl(
            SqliteLedger(tmp_path / "l.sqlite"), ServiceResolver()
        ),
    }
    with serving(kind, impls[kind]()) as target:
        method = target.methods()[0]
        huge = b"\x0a" + b"\xff\xff\xff\x3f" + b"x" * (MAX_MESSAGE_BYTES + 1024)
        _run(target.loop, target.call(method, huge, 60.0))
        assert target.codes == Counter({"RESOURCE_EXHAUSTED": 1})
        _run(target.loop, target.health())


@pytest.mark.parametrize(
    "request_",
    [
        model_pb2.UpdateWeightsRequest(version="v2", replicas=2**32 - 1),
        model_pb2.UpdateWeightsRequest(version="v2", drain_timeout_s=math.nan),
    ],
)
def test_an_update_weights_that_would_hang_the_model_service_is_refused(
    request_: model_pb2.UpdateWeightsRequest,
) -> None:
    """Found by the fuzzer: replicas=2**32-1 built backends in a loop that held the event
    loop (the service stopped answering); a NaN drain timeout reached the swap."""
    impl = ModelServiceImpl([SimulatedBackend.fast(success_rate=1.0)])
    with serving("model", impl) as target:
        method = SERVICES["model"].methods_by_name["UpdateWeights"]
        _run(target.loop, target.call(method, request_.SerializeToString(), 20.0))
        assert target.codes == Counter({"INVALID_ARGUMENT": 1})
        _run(target.loop, target.health())


@pytest.mark.parametrize("uri", ["\x00", "a" * 300])
def test_a_snapshot_uri_with_a_nul_byte_or_too_long_is_a_bad_request(
    tmp_path: Path, uri: str
) -> None:
    """Found by the fuzzer: CreateEnvironment(restore_from="\\x00") answered INTERNAL
    (ValueError: embedded null byte), and so did a 300-character name (ENAMETOOLONG)."""
    root = tmp_path / "sandboxes"
    impl = SandboxEnvironmentService(EnvServiceConfig(root_dir=root, max_environments=2))
    with serving("env", impl) as target:
        method = SERVICES["env"].methods_by_name["CreateEnvironment"]
        request = env_pb2.CreateEnvironmentRequest(image="host", restore_from=uri)
        _run(target.loop, target.call(method, request.SerializeToString(), 20.0))
        assert target.codes == Counter({"INVALID_ARGUMENT": 1})
        _run(target.loop, target.health())
    assert not live_sandboxes(root)
