"""Fixtures of the containment battery: a service with small limits, an attacker
environment, a victim environment beside it, and host state to compare against.

Every hostile action goes through the service API (`ExecuteStep`, `SubmitAction`), in
process or over gRPC. `Arena.assert_contained()` then checks, directly on the host,
that nothing changed (planted secrets, watched mounts, sysctls, hostname, files named
after the test's marker, kernel keys, the test's own TCP listener), that the victim's
files and daemon are intact, and that the attacker's environment still answers.

Every arena runs once per backend: ``local`` (bubblewrap) and ``docker`` (runc, on one
private dockerd and image for the whole session). A case specific to one mechanism says
so with ``@pytest.mark.only_backends("local", reason=...)``; the reason is required.
On Docker the victim's host workspace is its container's overlay ``MergedDir``, and its
host processes are found (and checked) by the container's cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import secrets
import shlex
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from megaflow.env.docker.sandbox import RUNSC_PIDS_OVERHEAD
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.testing.dockerd import Dockerd, dockerd_available, prepared_dockerd
from megaflow.testing.images import SECURITY_TOOLS, build_python_image
from megaflow.v1 import env_pb2
from tests.security import hoststate
from tests.security.backends import (
    DOCKER_BACKENDS,
    DOCKER_IMAGE,
    docker_workspace_holding,
    env_request,
    parametrize_backends,
    sandbox_containers,
)

DENIED = (
    "Read-only file system",
    "No such file or directory",
    "nonexistent directory",  # busybox sh's wording of ENOENT
    "Permission denied",
)
"""Messages of a refused write (bash's and busybox sh's wordings)."""

MEMORY_MIB = 128
PIDS = 64
OUTPUT_BYTES = 65_536
STEP_TIMEOUT_S = 10.0
CALL_SLACK_S = 30.0
"""Extra time a call may take beyond its step timeout before the test calls it hung."""
VICTIM_TEXT = b"the victim's work, which must survive every attack\n"
SECRET_ENV = "MEGAFLOW_SECURITY_TEST_SECRET"
WORKSPACE_MIB, TMP_MIB, INODES = 64, 32, 20_000
"""Docker/gVisor: the service's default quotas (a task asks for none): /workspace and
/tmp tmpfs sizes and each one's inode limit."""


def memory_limit_bytes(backend: str) -> int:
    """The sandbox's cgroup memory limit (Docker/gVisor: plus its tmpfs quotas)."""
    return (MEMORY_MIB + (WORKSPACE_MIB + TMP_MIB if backend != "local" else 0)) * 1024 * 1024


def pids_limit(backend: str) -> int:
    """The sandbox's cgroup pids limit (gVisor: plus runsc's own host threads)."""
    return PIDS + (RUNSC_PIDS_OVERHEAD if backend == "gvisor" else 0)


class EnvApi(Protocol):
    """What both the in-process service and the gRPC client offer."""

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse: ...

    async def execute_step(
        self, request: env_pb2.ExecuteStepRequest
    ) -> env_pb2.ExecuteStepResponse: ...

    async def submit_action(
        self, request: env_pb2.SubmitActionRequest
    ) -> env_pb2.SubmitActionResponse: ...

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse: ...


@dataclass
class Victim:
    env_id: str
    workspace: Path
    """Host folder seen as /workspace by the victim (gVisor: where it would be)."""
    daemon_pid: int
    """Host pid of a long-running process of the victim."""
    daemon_ticks: int
    container_id: str = ""
    """Docker: the victim's container."""
    host_view: bool = True
    """Whether the host sees the victim's files at `workspace` (not under gVisor)."""


@dataclass
class Arena:
    backend: str
    """``local``, ``docker`` or ``gvisor``: where the attacker and victim run."""
    dockerd: Dockerd | None
    """The session's daemon (docker arenas only)."""
    service: SandboxEnvironmentService
    api: EnvApi
    attacker: str
    victim: Victim
    host: hoststate.HostSnapshot
    marker: str
    """Unique per test: name every file or process an attack creates after it."""
    host_dir: Path
    """A host folder (outside any sandbox) holding a planted secret."""
    secret_file: Path
    root_secret: Path
    secret: bytes
    env_secret: str
    listener_port: int
    connections: list[str] = field(default_factory=list)
    containers: dict[str, str] = field(default_factory=dict)
    """Docker: container id of the victim and the first attacker (``victim``/``attacker``)."""

    @property
    def docker(self) -> bool:
        """A container of the session's dockerd (``docker``: runc, ``gvisor``: runsc)."""
        return self.backend in DOCKER_BACKENDS

    def bash(self, command: str) -> str:
        """``command`` run by bash: the local shell is bash, Docker's step shell is
        busybox sh (no ``/dev/tcp``, ``exec -a``, ``disown``), so there it is wrapped."""
        return command if self.backend == "local" else f"bash -c {shlex.quote(command)}"

    def private_layers_holding(self, path: str) -> list[str]:
        """Docker: ids of the sandbox containers whose private (upper) layer holds
        ``path`` (absolute, symlinks already resolved as the container sees them)."""
        assert self.dockerd is not None
        rel = posixpath.normpath(path).lstrip("/")
        return [
            str(info["Id"])
            for info in sandbox_containers(self.dockerd)
            if os.path.lexists(Path(info["GraphDriver"]["Data"]["UpperDir"], rel))
        ]

    async def assert_written_privately(self, path: str) -> None:
        """Docker: a write outside /workspace landed in the attacker's own copy-on-write
        layer only (not the victim's, not the host's: `assert_contained` checks those).
        ``path`` is resolved in the attacker (relative to /workspace, through links)."""
        r = await self.step(f"cd /workspace && readlink -f -- {shlex.quote(path)}")
        assert r.exit_code == 0, r.output
        resolved = r.output.strip()
        layers = self.private_layers_holding(resolved)
        assert layers == [self.containers["attacker"]], (path, resolved, layers)

    def request(self, **fields: Any) -> env_pb2.CreateEnvironmentRequest:
        """A CreateEnvironmentRequest placed on this arena's backend."""
        return env_request(self.backend, **fields)

    async def create(self, **fields: Any) -> str:
        """Create an environment on this arena's backend; its id."""
        return (await self.service.create_environment(self.request(**fields))).env_id

    @property
    def pwn(self) -> str:
        """A file name an attack may try to create on the host."""
        return f"pwned-{self.marker}"

    async def step(
        self, command: str, *, timeout_s: float = STEP_TIMEOUT_S, env_id: str = ""
    ) -> env_pb2.ExecuteStepResponse:
        """Run ``command`` (in the attacker unless ``env_id``); a hang fails the test."""
        request = env_pb2.ExecuteStepRequest(
            env_id=env_id or self.attacker, command=command, timeout_s=timeout_s
        )
        async with asyncio.timeout(timeout_s + CALL_SLACK_S):
            return await self.api.execute_step(request)

    async def act(self, **action: Any) -> env_pb2.SubmitActionResponse:
        """One SubmitAction of the attacker (``read_file=...``, ``write_file=...``...)."""
        async with asyncio.timeout(60.0 + CALL_SLACK_S):
            return await self.api.submit_action(
                env_pb2.SubmitActionRequest(env_id=self.attacker, **action)
            )

    async def read(self, path: str) -> env_pb2.SubmitActionResponse:
        return await self.act(read_file=env_pb2.ReadFile(path=path))

    async def write(self, path: str, content: bytes) -> env_pb2.SubmitActionResponse:
        return await self.act(write_file=env_pb2.WriteFile(path=path, content=content))

    async def assert_victim_intact(self) -> None:
        victim = self.victim
        assert hoststate.start_ticks(victim.daemon_pid) == victim.daemon_ticks, "victim killed"
        if victim.host_view:
            assert (victim.workspace / "victim.txt").read_bytes() == VICTIM_TEXT
        r = await self.step("cat victim.txt", env_id=victim.env_id)
        assert (r.exit_code, r.output) == (0, VICTIM_TEXT.decode()), r.output

    async def assert_serving(self) -> None:
        r = await self.step("echo ok")
        assert r.exit_code == 0 and r.output.splitlines()[-1:] == ["ok"], r.output

    async def assert_contained(self) -> None:
        """The host and the victim are unaffected, and the service keeps serving."""
        self.host.assert_unchanged()
        assert not self.connections, f"the host listener was reached: {self.connections}"
        await self.assert_victim_intact()
        await self.assert_serving()


def failed(r: env_pb2.ExecuteStepResponse) -> bool:
    """The step reported failure: a non-zero exit code (timeouts are 137)."""
    return r.exit_code != 0


async def eventually(check: Callable[[], object], timeout_s: float = 5.0) -> bool:
    """Poll ``check`` until it is truthy (True) or ``timeout_s`` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def host_global_ipv4() -> list[str]:
    """The host's non-loopback IPv4 addresses."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        parametrize_backends(metafunc)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "only_backends(*names, reason): run this security case on these backends only",
    )
    config.addinivalue_line(
        "markers",
        "hole_on(backend, reason): a known containment hole of that backend "
        "(xfail(strict=True) there only)",
    )


@pytest.fixture(scope="session")
def security_dockerd() -> Iterator[Dockerd]:
    """One private dockerd and the battery's image (busybox, bash, python3, a few host
    tools) for the whole session; stopped (containers removed) at its end."""
    reason = dockerd_available()
    if reason is not None:
        pytest.skip(f"dockerd cannot run here: {reason}")
    with prepared_dockerd(
        lambda client: build_python_image(client, DOCKER_IMAGE, tools=SECURITY_TOOLS)
    ) as daemon:
        yield daemon


async def _wait_for_host_pid(marker: str) -> int:
    for _ in range(200):
        if pids := hoststate.host_pids_with(marker):
            return pids[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no host process carries {marker}")


async def _start_victim(
    service: SandboxEnvironmentService, marker: str, backend: str, dockerd: Dockerd | None
) -> Victim:
    env_id = (
        await service.create_environment(
            env_request(backend, owner="victim", files={"victim.txt": VICTIM_TEXT})
        )
    ).env_id
    tag = f"victim-{marker}"
    r = await service.execute_step(
        env_pb2.ExecuteStepRequest(
            env_id=env_id,
            command=f"nohup sh -c 'sleep 1000; : {tag}' >/dev/null 2>&1 &",
            timeout_s=STEP_TIMEOUT_S,
        )
    )
    assert r.exit_code == 0, r.output
    if backend == "gvisor":  # its processes live in the Sentry: the host sees the Sentry
        pid = _sentry_pid(dockerd)
    else:
        pid = await _wait_for_host_pid(tag)
    ticks = hoststate.start_ticks(pid)
    assert ticks is not None
    container_id, host_view = "", True
    if dockerd is None:
        workspace = _host_workspace_holding(service.config.root_dir, VICTIM_TEXT)
    else:
        workspace, container_id, host_view = docker_workspace_holding(dockerd, VICTIM_TEXT)
        # Found by its command line; it must be a process of the victim's container.
        assert pid in hoststate.cgroup_pids(container_id), "victim daemon not in its cgroup"
    return Victim(env_id, workspace, pid, ticks, container_id, host_view)


def _sentry_pid(dockerd: Dockerd | None) -> int:
    """gVisor: the host pid of the one sandbox container's init (its runsc Sentry side)."""
    assert dockerd is not None
    (info,) = sandbox_containers(dockerd)
    return int(info["State"]["Pid"])


def _host_workspace_holding(root_dir: Path, text: bytes) -> Path:
    """The host folder of the one sandbox workspace whose victim.txt holds ``text``."""
    found = [p.parent for p in root_dir.glob("*/workspace/victim.txt") if p.read_bytes() == text]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
async def arena(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Arena]:
    dockerd: Dockerd | None = (
        request.getfixturevalue("security_dockerd") if backend in DOCKER_BACKENDS else None
    )
    marker = f"mf{secrets.token_hex(6)}"
    env_secret = f"env-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv(SECRET_ENV, env_secret)  # before any sandbox is spawned
    secret = f"SECRET-{secrets.token_hex(8)}\n".encode()
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    secret_file = host_dir / "secret.txt"
    secret_file.write_bytes(secret)
    root_secret = Path("/root") / f".megaflow-secret-{secrets.token_hex(6)}"
    root_secret.write_bytes(secret)
    connections: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(str(writer.get_extra_info("peername")))
        writer.close()

    listener = await asyncio.start_server(on_connect, "0.0.0.0", 0)
    port = listener.sockets[0].getsockname()[1]
    root_dir = tmp_path / "sb"
    service = SandboxEnvironmentService(
        EnvServiceConfig(
            root_dir=root_dir,
            max_environments=4,
            memory_mib=MEMORY_MIB,
            pids=PIDS,
            output_bytes=OUTPUT_BYTES,
            step_timeout_s=STEP_TIMEOUT_S,
            max_step_timeout_s=60.0,
            reap_interval_s=1.0,
            artifact_dir=tmp_path / "artifacts",
            docker_host=None if dockerd is None else dockerd.base_url,
            backends={}
            if dockerd is None
            else {"docker": {"workspace_mib": WORKSPACE_MIB, "tmp_mib": TMP_MIB, "inodes": INODES}},
        )
    )
    try:
        await service.start()
        victim = await _start_victim(service, marker, backend, dockerd)
        attacker = (await service.create_environment(env_request(backend, owner="attacker"))).env_id
        containers = {}
        if dockerd is not None:
            ids = {str(c["Id"]) for c in sandbox_containers(dockerd)}
            containers["victim"] = victim.container_id
            (containers["attacker"],) = ids - {victim.container_id}
        snapshot = hoststate.HostSnapshot.take(
            marker, {secret_file: secret, root_secret: secret}, (host_dir,)
        )
        yield Arena(
            backend=backend,
            dockerd=dockerd,
            service=service,
            api=service,
            attacker=attacker,
            victim=victim,
            host=snapshot,
            marker=marker,
            host_dir=host_dir,
            secret_file=secret_file,
            root_secret=root_secret,
            secret=secret,
            env_secret=env_secret,
            listener_port=port,
            connections=connections,
            containers=containers,
        )
        await service.stop()
        assert not hoststate.host_pids_with(marker), "a sandbox process outlived the service"
        assert not hoststate.mounts_under(tmp_path), "a sandbox mount outlived the service"
        assert not any(root_dir.iterdir()), "a sandbox folder outlived the service"
        if dockerd is not None:
            assert not sandbox_containers(dockerd), "a sandbox container outlived the service"
            for container_id in containers.values():  # found by cgroup, whatever their name
                assert not hoststate.cgroup_pids(container_id), "a container process survived"
    finally:
        await service.stop()
        listener.close()
        await listener.wait_closed()
        root_secret.unlink(missing_ok=True)
        hoststate.unlink_keys(marker)


@pytest.fixture
async def grpc_arena(arena: Arena) -> AsyncIterator[Arena]:
    """The same arena, but the attacker's calls cross the wire (GrpcServer + client)."""
    async with GrpcServer("127.0.0.1:0", {"env": arena.service}) as server:
        client = EnvironmentServiceClient(server.address, timeout_s=60.0 + CALL_SLACK_S)
        try:
            arena.api = client
            yield arena
        finally:
            arena.api = arena.service
            with contextlib.suppress(Exception):
                await client.close()
