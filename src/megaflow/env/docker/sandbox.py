"""``DockerSandbox``: one container (runc or gVisor's runsc) with a persistent shell.

Life of a sandbox::

    engine = DockerEngine("unix:///run/docker.sock")
    sb = DockerSandbox("sb-1", engine=engine, image="busybox:megaflow", runtime="runsc")
    await sb.start()                      # create + start the container, attach a shell
    r = await sb.execute("cd /tmp && export X=1", timeout_s=10)
    r = await sb.execute("echo $X; pwd", timeout_s=10)   # "1\\n/tmp\\n"
    await sb.stop()                       # the container is removed

The container runs ``docker-init`` (tini, reaps orphans) with ``sleep infinity``
under it, ``--network none``, memory (swap included), pids and CPU-share limits and
owner labels (:mod:`megaflow.env.docker.orphans`), hardened by default
(:mod:`megaflow.env.docker.hardening`): every capability dropped but
:data:`~megaflow.env.docker.hardening.CAPABILITIES`, ``no-new-privileges``, MegaFlow's
seccomp profile, a non-root user, and ``/workspace`` and ``/tmp`` on size- and
inode-limited tmpfs mounts (the disk quota, on by default). The shell is a ``docker exec`` of
``/bin/sh`` attached over the daemon's socket (:mod:`megaflow.env.docker.stream`),
speaking :mod:`megaflow.env.docker.shell`.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Mapping
from typing import ClassVar, TypeVar

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

from megaflow.core.errors import InvalidRequestError, SandboxError
from megaflow.env.docker import files, hardening
from megaflow.env.docker.engine import DockerEngine
from megaflow.env.docker.orphans import owner_labels
from megaflow.env.docker.session import ShellSession
from megaflow.env.docker.shell import SAFE_PATH, command_line, sh_quote, user_command_line
from megaflow.env.sandbox import (
    Capabilities,
    RecreatableSandbox,
    SandboxLifecycle,
    SnapshotSandbox,
    SuspendableSandbox,
)
from megaflow.env.shell import Exchange, LineBuilder, ShellSandbox, sandbox_path

WORKDIR = "/workspace"
MAX_FILE_BYTES = 8 * 1024 * 1024
"""Largest file :meth:`DockerSandbox.read_file` / :meth:`DockerSandbox.write_file` move."""
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024
"""Largest archive :meth:`put_files`, :meth:`snapshot` and :meth:`restore` move."""
FILE_OP_TIMEOUT_S = 60.0
RUNSC_PIDS_OVERHEAD = 64
"""Added to the pids limit under gVisor: the limit counts the host threads of its
sentry and gofer too (a plain 24 does not even let the sandbox start)."""
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RUNTIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SH_PREFIX = re.compile(r"^(?:sh|ash|dash|bash|/bin/sh)(?:: line \d+)?: ", re.MULTILINE)
T = TypeVar("T")


class DockerSandbox(SandboxLifecycle, ShellSandbox):
    """A Docker container with a persistent shell, memory, pids and CPU limits.

    Not safe to share between event loops. Calls on one sandbox are serialised;
    :meth:`stop` may be called at any time. A call on a suspended sandbox resumes it
    first.

    Arguments:

    - ``sandbox_id``: letters, digits, ``_.-``, <= 64; part of the container name.
    - ``engine``: the daemon connection (shared by many sandboxes).
    - ``image``: a local image with ``/bin/sh``, ``base64``, ``tar`` (busybox is enough).
    - ``runtime``: ``runc`` (default) or ``runsc`` (gVisor), as registered in dockerd.
    - ``memory_mib``: memory limit, swap included; ``pids``: process limit (under
      gVisor, plus :data:`RUNSC_PIDS_OVERHEAD` for its own host threads);
      ``cpu_shares``: relative CPU weight (1024 = Docker's default).
    - ``output_bytes``: output kept per command: the first and last halves.
    - ``quota``: size and inode limits of ``/workspace`` and ``/tmp``
      (:class:`~megaflow.env.docker.hardening.DiskQuota`; tmpfs, whose pages count to
      the memory cgroup: the container's limit is ``memory_mib`` plus both sizes, so a
      full quota is ENOSPC, never an OOM kill; a workload may use unused quota as memory).
    - ``user``: ``uid:gid`` of the workload (default 1000:1000); ``root`` only under
      gVisor or on a daemon with user-namespace remapping (checked at start).
    - ``profile``: ``hardened`` (default) or ``docker-default`` (Docker's defaults:
      for benchmarks that measure what hardening costs, never for tasks).

    If the shell dies (``exit``, killed for memory), the next call starts a new one in
    the same container: files persist, the environment and working folder start
    afresh, and the output says so.
    """

    _BOOT_ERRORS = (SandboxError,)  # the daemon's failures, already wrapped

    WORKDIR = WORKDIR
    capabilities: ClassVar[Capabilities] = Capabilities(suspend=True, snapshot=True, recreate=True)

    def __init__(
        self,
        sandbox_id: str,
        *,
        engine: DockerEngine,
        image: str,
        runtime: str = "runc",
        memory_mib: int = 1024,
        pids: int = 256,
        cpu_shares: int = 1024,
        output_bytes: int = 64_000,
        quota: hardening.DiskQuota | None = None,
        user: str = hardening.DEFAULT_USER,
        profile: str = "hardened",
    ) -> None:
        if not _SANDBOX_ID.fullmatch(sandbox_id):
            raise InvalidRequestError(f"invalid sandbox id {sandbox_id!r}")
        if not _RUNTIME.fullmatch(runtime):
            raise InvalidRequestError(f"invalid runtime {runtime!r}")
        if not image or "\0" in image:
            raise InvalidRequestError("image must be a non-empty string")
        if memory_mib < 16 or pids < 8 or output_bytes < 256 or not 2 <= cpu_shares <= 262144:
            raise InvalidRequestError(
                f"sandbox limits out of range: memory_mib={memory_mib} (min 16), "
                f"pids={pids} (min 8), output_bytes={output_bytes} (min 256), "
                f"cpu_shares={cpu_shares} (2..262144)"
            )
        if profile not in hardening.PROFILES:
            raise InvalidRequestError(f"unknown profile {profile!r}; expected {hardening.PROFILES}")
        hardening.check_user(user)
        if runtime == "runsc":
            hardening.check_runsc_limits(memory_mib, quota or hardening.DiskQuota())
        super().__init__(sandbox_id)
        self.image = image
        self.quota = quota or hardening.DiskQuota()
        self.user = user
        self.profile = profile
        self.runtime = runtime
        self.container_name = f"megaflow-{sandbox_id}-{secrets.token_hex(4)}"
        self._engine = engine
        self._memory_mib = memory_mib
        self._pids = pids
        self._cpu_shares = cpu_shares
        self._output_bytes = output_bytes
        self._suspended = False
        self._session = ShellSession(engine, self.container_name, sandbox_id)
        self._lock = asyncio.Lock()
        self._inflight: set[asyncio.Future[object]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def workdir(self) -> str:
        return WORKDIR

    @property
    def alive(self) -> bool:
        """True from a successful start() until stop(), unless the sandbox broke for good."""
        return self._state == "running" and self._session.broken is None

    async def _boot(self) -> None:
        """Create and start the container and its shell (SandboxLifecycle.start)."""
        if self.user_is_root and self.profile == "hardened" and self.runtime != "runsc":
            userns = await self._engine.call("info", hardening.daemon_remaps_users)
            if not userns:
                raise InvalidRequestError(
                    f"sandbox {self.sandbox_id}: user 'root' needs an isolating runtime: "
                    "runtime 'runsc' (gVisor) or a docker daemon with userns-remap; "
                    "this daemon runs runc without user namespaces"
                )
        await self._tracked(self._engine.call("create", self._create))
        await self._tracked(self._engine.call("start", lambda api: api.start(self.container_name)))
        await self._session.spawn()

    async def recreate(self, timeout_s: float = 30.0) -> None:
        """Replace the container by a fresh one from the image (a persistent pool's reset):
        nothing of the previous tenant survives, outside the workdir included."""
        if self._state != "running":
            raise SandboxError(f"sandbox {self.sandbox_id} is not running; cannot recreate it")
        self._state = "stopped"
        await self._teardown()
        self.container_name = f"megaflow-{self.sandbox_id}-{secrets.token_hex(4)}"
        self._session = ShellSession(self._engine, self.container_name, self.sandbox_id)
        self._suspended = False
        self._state = "new"
        await self.start(timeout_s)

    async def suspend(self) -> None:
        """Freeze every process of the container (``docker pause``)."""
        async with self._lock:
            self._check_running()
            if not self._suspended:
                await self._engine.call("pause", lambda api: api.pause(self.container_name))
                self._suspended = True

    async def resume(self) -> None:
        """Thaw a suspended container (``docker unpause``)."""
        async with self._lock:
            self._check_running()
            await self._resume_locked()

    # -- commands and files ------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        """Read a file as the container sees it (symlinks resolve inside)."""
        target = sandbox_path(path, WORKDIR)
        code = f"__mf_read {sh_quote(target)} {MAX_FILE_BYTES}"
        raw = await self._file_op("read_file", path, code, files.b64_cap(MAX_FILE_BYTES))
        return files.b64_decode(raw, f"read_file {path!r}")

    async def write_file(self, path: str, content: bytes) -> None:
        """Write ``content`` to ``path`` inside the container, creating parent folders."""
        target = sandbox_path(path, WORKDIR)
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise InvalidRequestError("write_file content must be bytes")
        data = bytes(content)
        if len(data) > MAX_FILE_BYTES:
            raise InvalidRequestError(
                f"write_file {path!r}: {len(data)} bytes is more than {MAX_FILE_BYTES}"
            )
        code = f"__mf_write {sh_quote(target)} '{files.b64_encode(data)}' {len(data)}"
        await self._file_op("write_file", path, code, 65536)

    async def put_files(self, files_: Mapping[str, bytes]) -> None:
        """Write files (paths relative to /workspace) in one transfer."""
        archive = await asyncio.to_thread(files.tar_files, files_, MAX_ARCHIVE_BYTES)
        code = f"__mf_untar '{files.b64_encode(archive)}' {WORKDIR}"
        await self._file_op("put_files", WORKDIR, code, 65536)

    async def snapshot(self) -> bytes:
        """A tar archive of /workspace as it is now."""
        raw = await self._file_op(
            "snapshot", WORKDIR, f"__mf_tar {WORKDIR}", files.b64_cap(MAX_ARCHIVE_BYTES)
        )
        return files.b64_decode(raw, "snapshot")

    async def restore(self, archive: bytes) -> None:
        """Replace the content of /workspace with a :meth:`snapshot` archive."""
        await asyncio.to_thread(files.check_archive, archive, MAX_ARCHIVE_BYTES)
        code = f"__mf_clear {WORKDIR} && __mf_untar '{files.b64_encode(archive)}' {WORKDIR}"
        await self._file_op("restore", WORKDIR, code, 65536)

    async def cwd(self) -> str:
        """The persistent shell's current folder."""
        raw = await self._file_op("cwd", ".", 'command printf %s "$PWD"', 65536)
        return raw.decode("utf-8", errors="surrogateescape")

    # -- internals ---------------------------------------------------------------------

    @property
    def user_is_root(self) -> bool:
        return self.user.split(":")[0] in ("root", "0")

    @property
    def memory_limit_mib(self) -> int:
        """The container's memory limit: the workload's plus its tmpfs quotas (files
        have their own room: a full quota is ENOSPC, never an OOM kill of the shell)."""
        if self.profile != "hardened":
            return self._memory_mib
        return self._memory_mib + self.quota.workspace_mib + self.quota.tmp_mib

    def _create(self, api: docker.APIClient) -> None:
        limit = self.memory_limit_mib * 1024 * 1024
        options: dict[str, object] = {}
        user, home = "", "/root"
        if self.profile == "hardened":
            options = hardening.host_options(self.quota, self.user)
            user = self.user
            home = "/root" if self.user_is_root else WORKDIR
        host_config = api.create_host_config(
            network_mode="none",
            mem_limit=limit,
            memswap_limit=limit,
            pids_limit=self._pids + (RUNSC_PIDS_OVERHEAD if self.runtime == "runsc" else 0),
            cpu_shares=self._cpu_shares,
            runtime=self.runtime,
            init=True,
            **({"security_opt": ["no-new-privileges"]} | options),
        )
        api.create_container(
            self.image,
            command=["sleep", "infinity"],
            name=self.container_name,
            hostname="sandbox",
            working_dir=WORKDIR,
            user=user,
            environment={"PATH": SAFE_PATH, "HOME": home},
            labels=owner_labels(self.sandbox_id),
            network_disabled=True,
            host_config=host_config,
        )

    def _check_running(self) -> None:
        if self._state != "running":
            raise SandboxError(f"sandbox {self.sandbox_id} is not running ({self._state})")

    async def _resume_locked(self) -> None:
        if self._suspended:
            await self._engine.call("unpause", lambda api: api.unpause(self.container_name))
            self._suspended = False

    def _user_line(self, command: str, nonce: str) -> bytes:
        return user_command_line(command, nonce)

    async def _exchange(self, line: LineBuilder, timeout_s: float, cap: int) -> Exchange:
        return await self._session.exchange(line, timeout_s, cap)

    async def _ready_shell(self) -> str:
        """Check the sandbox is usable (resuming it); resync or restart the shell."""
        self._check_running()
        await self._resume_locked()
        note = await self._session.ready()
        self._check_running()
        return note

    async def _file_op(self, op: str, path: str, code: str, cap: int) -> bytes:
        async with self._lock:
            await self._ready_shell()
            ex = await self._exchange(lambda n: command_line(code, n), FILE_OP_TIMEOUT_S, cap)
        if ex.timed_out:
            raise SandboxError(f"{op} {path!r}: timed out after {FILE_OP_TIMEOUT_S} s")
        if ex.status is None:
            raise SandboxError(f"{op} {path!r}: the shell died ({ex.note})")
        if ex.sink.truncated:
            raise InvalidRequestError(f"{op} {path!r}: the result is too large")
        if ex.status != 0:
            message = _SH_PREFIX.sub("", ex.sink.text()).strip() or f"exit status {ex.status}"
            raise InvalidRequestError(f"{op} {path!r}: {message}")
        return ex.sink.raw()

    async def _tracked(self, call: Awaitable[T]) -> T:
        """Await a Docker call that teardown must outwait (a thread cannot be cancelled)."""
        future = asyncio.ensure_future(call)
        self._inflight.add(future)  # type: ignore[arg-type]
        future.add_done_callback(self._inflight.discard)  # type: ignore[arg-type]
        return await asyncio.shield(future)

    async def _teardown(self) -> None:
        """Close the shell and force-remove the container (after in-flight calls end)."""
        self._session.stopped = True
        self._session.close()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self._engine.timeout_s)

        def remove(api: docker.APIClient) -> None:
            try:
                api.remove_container(self.container_name, force=True)
            except docker.errors.NotFound:
                pass

        if not self._engine.reachable():
            raise SandboxError(
                f"sandbox {self.sandbox_id}: docker daemon unreachable at "
                f"{self._engine.base_url}; container {self.container_name} not removed"
            )
        started = time.monotonic()
        while True:
            try:
                await self._engine.call("remove", remove)
                return
            except SandboxError as exc:
                # 409 "removal already in progress": retry a while; anything else is final.
                cause = exc.__cause__
                conflict = isinstance(cause, docker.errors.APIError) and cause.status_code == 409
                if not conflict or time.monotonic() - started > 10.0:
                    raise
                await asyncio.sleep(0.1)


def _conforms(
    sandbox: DockerSandbox,
) -> tuple[SuspendableSandbox, SnapshotSandbox, RecreatableSandbox]:
    """Never called: makes mypy check DockerSandbox against the protocols it declares."""
    return sandbox, sandbox, sandbox
