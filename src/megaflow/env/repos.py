"""A task's repository, by reference: a `WorkspaceSource` made into a sandbox's workspace.

``artifact`` ("sha256:<hex>"): a tar archive from the artifact store (`megaflow.env.blobs`),
fetched once per host into its cache, extracted into the workspace.

``git`` (url, commit): any URL ``git clone`` takes (a local path or bare repository
included). Each URL is cloned once per host as a mirror (updated when a commit is not
in it yet; a branch or tag name is resolved in the mirror as it is, so pin commits by
id); a workspace gets a shallow clone of exactly the requested commit from that
mirror, checked out detached. Only that commit is there: no later history an agent
could read a fix from, and a ``.git`` small enough to copy per task. Its ``origin``
names the task's URL.

A local sandbox's workspace is a host folder (`LocalSandbox.host_workspace`), written
directly; any other backend gets the tree as one archive through its ``restore``
(bounded by that backend's archive limit).

`WorkspaceMaker.setup` then runs the task's setup commands in the sandbox's shell, in
the workspace, in order: exported variables and activated environments stay for the
agent. One that exits non-zero breaks the task for good (InvalidRequestError, with its
output); one past the setup budget is a DeadlineExceededError (retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shlex
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from megaflow.core.errors import DeadlineExceededError, InvalidRequestError
from megaflow.core.subprocesses import run_program
from megaflow.env import backends
from megaflow.env.blobs import BlobCache, BlobStore, check_digest, write_tar
from megaflow.env.config import EnvServiceConfig
from megaflow.env.sandbox import HostWorkspaceSandbox, Sandbox
from megaflow.v1 import common_pb2, env_pb2

OUTPUT_TAIL_CHARS = 2000
# No prompt may wait for a person: a URL that needs credentials git lacks fails at once.
_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "true",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    "LC_ALL": "C",
    # A host workspace may belong to the sandbox's unprivileged uid (local backend):
    # the service's git works in it all the same, then hands the files over.
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "safe.directory",
    "GIT_CONFIG_VALUE_0": "*",
}
# The mirror's side of a workspace's fetch: any commit by id, whatever refs point at it;
# no delta search and no compression (the pack only crosses a pipe to the same disk:
# a 200 MiB tree fetches in 6 s instead of 27 s, bench/repo_bench.py).
_UPLOAD_PACK = (
    "--upload-pack=git -c uploadpack.allowAnySHA1InWant=true -c pack.window=0 "
    "-c pack.compression=0 upload-pack"
)
_T = TypeVar("_T")


class _Stopped(Exception):
    """A thread's work was abandoned by its caller (a timeout or a cancellation)."""


class WorkspaceMaker:
    """Makes workspaces from artifacts and git repositories, with this host's caches."""

    def __init__(self, blobs: BlobCache, git_dir: Path) -> None:
        self.blobs = blobs
        self.git = GitMirrors(git_dir)

    @classmethod
    def from_config(cls, config: EnvServiceConfig) -> WorkspaceMaker:
        store = BlobStore(config.artifact_url or config.artifact_dir)
        cache = config.artifact_cache_dir
        blobs = BlobCache(store, cache / "blobs", config.artifact_cache_mib * 1024 * 1024)
        return cls(blobs, cache / "git")

    async def make(
        self, sandbox: Sandbox, request: env_pb2.CreateEnvironmentRequest, timeout_s: float
    ) -> None:
        """Fill the fresh workspace from ``request.workspace``; nothing if it names none."""
        if not request.HasField("workspace"):
            return
        source = request.workspace
        kind = source.WhichOneof("source")
        async with _budget(timeout_s, "making the workspace"):
            if kind == "artifact":
                await self._artifact(sandbox, source.artifact, timeout_s)
            elif kind == "git":
                await self._git(sandbox, source.git, timeout_s)
            else:
                raise InvalidRequestError("CreateEnvironmentRequest.workspace names no source")

    async def setup(self, sandbox: Sandbox, commands: Sequence[str], timeout_s: float) -> None:
        """Run ``commands`` in the workspace, in order, within ``timeout_s`` in all."""
        if not commands:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        home = f"cd {shlex.quote(backends.workdir(sandbox))}"
        for index, command in enumerate([home, *commands, home]):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceededError(f"setup commands passed their {timeout_s:.1f}s budget")
            result = await sandbox.execute(command, remaining)
            what = f"setup command {index}/{len(commands)} {command!r}"
            tail = result.output[-OUTPUT_TAIL_CHARS:]
            if result.timed_out:
                raise DeadlineExceededError(
                    f"{what} passed the {timeout_s:.1f}s setup budget; output:\n{tail}"
                )
            if result.exit_code != 0:
                raise InvalidRequestError(f"{what} exited {result.exit_code}; output:\n{tail}")

    async def _artifact(self, sandbox: Sandbox, digest: str, timeout_s: float) -> None:
        check_digest(digest)
        async with self.blobs.blob(digest, timeout_s) as archive:
            workspace = _host_workspace(sandbox)
            if workspace is not None:
                await _in_thread(_extract, archive, workspace)
                await asyncio.to_thread(_hand_over, workspace)
            else:
                await backends.restore(sandbox, await asyncio.to_thread(archive.read_bytes))

    async def _git(self, sandbox: Sandbox, source: common_pb2.GitSource, timeout_s: float) -> None:
        if not source.url or source.url.startswith("-"):
            raise InvalidRequestError(f"git url {source.url!r} is not a repository URL or path")
        if source.commit.startswith("-"):
            raise InvalidRequestError(f"git commit {source.commit!r} is not a revision")
        mirror, sha = await self.git.resolve(source.url, source.commit, timeout_s)
        workspace = _host_workspace(sandbox)
        if workspace is not None:
            await _checkout(mirror, sha, source.url, workspace, timeout_s)
            await asyncio.to_thread(_hand_over, workspace)
            return
        with tempfile.TemporaryDirectory(prefix="megaflow-git-") as tmp:
            await _checkout(mirror, sha, source.url, Path(tmp), timeout_s)
            archive = await asyncio.to_thread(_tar_bytes, Path(tmp))
        await backends.restore(sandbox, archive)


class GitMirrors:
    """One ``git clone --mirror`` per URL on this host, fetched when a commit is missing."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)
        self._locks: dict[str, asyncio.Lock] = {}
        self.clones = 0  # mirrors cloned by this object (tests and benchmarks read it)

    async def resolve(self, url: str, commit: str, timeout_s: float) -> tuple[Path, str]:
        """(the URL's mirror, the full id of ``commit``; "" = the default branch's head)."""
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        mirror = self.dir / f"{key}.git"
        async with self._locks.setdefault(key, asyncio.Lock()):
            fresh = False
            if not mirror.exists():
                await self._clone(url, mirror, timeout_s)
                fresh = True
            revision = f"{commit or 'HEAD'}^{{commit}}"
            sha = await _rev_parse(mirror, revision, timeout_s) if commit else None
            if sha is None and not fresh:  # a newer commit, or the head asked for: update
                code, out = await _git(["fetch", "--prune", "origin"], timeout_s, cwd=mirror)
                if code != 0:
                    raise InvalidRequestError(f"cannot fetch {url!r}: {out[-OUTPUT_TAIL_CHARS:]}")
            if sha is None:
                sha = await _rev_parse(mirror, revision, timeout_s)
        if sha is None:
            raise InvalidRequestError(f"git commit {commit!r} is not in {url!r}")
        return mirror, sha

    async def _clone(self, url: str, mirror: Path, timeout_s: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".clone-"))
        try:
            self.clones += 1
            argv = ["clone", "--mirror", "--quiet", "--", url, str(tmp / "m.git")]
            code, out = await _git(argv, timeout_s)
            if code != 0:
                raise InvalidRequestError(f"cannot clone {url!r}: {out[-OUTPUT_TAIL_CHARS:]}")
            os.replace(tmp / "m.git", mirror)  # atomic: another process may clone it too
        except OSError as exc:  # another process's mirror won the rename: use that one
            if not await asyncio.to_thread(mirror.exists):
                raise InvalidRequestError(f"cannot cache a clone of {url!r}: {exc}") from exc
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)


async def _rev_parse(mirror: Path, revision: str, timeout_s: float) -> str | None:
    argv = ["rev-parse", "--verify", "--quiet", "--end-of-options", revision]
    code, out = await _git(argv, timeout_s, cwd=mirror)
    return out.strip() if code == 0 else None


async def _checkout(mirror: Path, sha: str, url: str, workspace: Path, timeout_s: float) -> None:
    """A shallow clone of exactly ``sha`` from ``mirror`` into ``workspace`` (detached)."""
    steps = [
        ["-c", "init.defaultBranch=main", "init", "--quiet"],
        ["fetch", "--quiet", "--no-tags", "--depth", "1", _UPLOAD_PACK, f"file://{mirror}", sha],
        ["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", sha],
        ["remote", "add", "origin", url],
    ]
    for argv in steps:
        code, out = await _git(argv, timeout_s, cwd=workspace)
        if code != 0:
            raise InvalidRequestError(
                f"git {argv[argv.index('-c') + 2 if '-c' in argv else 0]} of {url!r} at {sha} "
                f"failed: {out[-OUTPUT_TAIL_CHARS:]}"
            )


async def _git(argv: list[str], timeout_s: float, cwd: Path | None = None) -> tuple[int, str]:
    """Run git; (exit status, stdout+stderr). Killed (its whole group) at the timeout or
    on cancellation, which raise."""
    async with _budget(timeout_s, f"git {argv[0]}"):  # its cancellation kills git
        code, out, _ = await run_program(
            ["git", *argv], cwd=cwd, env={**os.environ, **_GIT_ENV}, merge_stderr=True
        )
    return code, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def _budget(timeout_s: float, what: str) -> Any:
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        raise DeadlineExceededError(f"{what} passed its {timeout_s:.1f}s budget") from exc


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(stop, *args)`` in a thread; when the caller is cancelled, ``stop`` is set and
    the thread is awaited (``fn`` checks it between steps), so nothing writes after."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(fn, stop, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(_Stopped, Exception):
            await future
        raise


def _extract(stop: threading.Event, archive: Path, workspace: Path) -> None:
    """Extract a tar archive member by member (safely: the "data" filter refuses links
    and paths out of ``workspace``, devices and setuid bits)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if stop.is_set():
                    raise _Stopped
                tar.extract(member, workspace, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidRequestError(f"the workspace archive cannot be extracted: {exc}") from exc


def _hand_over(workspace: Path) -> None:
    """Give what the service wrote into a host workspace to the workspace's owner (a
    local sandbox's unprivileged uid), so the workload can change it."""
    st = workspace.stat()
    if st.st_uid == os.geteuid():
        return
    for folder, dirs, files in os.walk(workspace):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), st.st_uid, st.st_gid)


def _tar_bytes(root: Path) -> bytes:
    buffer = io.BytesIO()
    write_tar(root, buffer)
    return buffer.getvalue()


def _host_workspace(sandbox: Sandbox) -> Path | None:
    """The workdir's host directory, where the backend declares one."""
    if not sandbox.capabilities.host_workspace:
        return None
    workspace: Path = cast(HostWorkspaceSandbox, sandbox).host_workspace
    return workspace
