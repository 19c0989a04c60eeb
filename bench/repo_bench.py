"""Repositories by reference: a 5,000-file / 200 MiB repository as an artifact digest or a
git commit, against shipping its files inline in the task (`TaskSpec.files`).

Reports the serialized sizes of the task and its `CreateEnvironmentRequest` both ways,
and `CreateEnvironment` over gRPC loopback: from an artifact with the host's cache
empty (fetch + verify + extract) and warm (extract), from git with no mirror (clone +
shallow checkout) and with one (shallow checkout). Inline, the repository passes the
service's 32 MiB limit on a create's files, so the inline baseline is measured on a
tenth of it (500 files / 20 MiB), beside an artifact of that same smaller repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.stats import ms, print_table, summarise
from megaflow.env.blobs import BlobStore
from megaflow.env.service import MAX_FILES_BYTES, EnvServiceConfig, SandboxEnvironmentService
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.testing.repos import make_repository
from megaflow.v1 import common_pb2, env_pb2

FILES = 5000
FILE_BYTES = 200 * 1024 * 1024 // FILES
SMALL_FILES = FILES // 10
GIT_TIMEOUT_S = 600.0
CREATE_TIMEOUT_S = 300.0


def _git_repository(path: Path) -> str:
    """Commit everything under ``path``; the commit's id."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "repository"]):
        subprocess.run(["git", *argv], cwd=path, env=env, check=True, timeout=GIT_TIMEOUT_S)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
    )
    return head.stdout.strip()


def _inline(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def _creates(
    client: EnvironmentServiceClient,
    request: env_pb2.CreateEnvironmentRequest,
    n: int,
    before: Callable[[], None] = lambda: None,
) -> list[float]:
    """``n`` timed creates (each released, untimed); ``before`` runs untimed before each."""
    samples = []
    for _ in range(n):
        before()
        t0 = time.perf_counter()
        env_id = (await client.create_environment(request, timeout_s=CREATE_TIMEOUT_S)).env_id
        samples.append(time.perf_counter() - t0)
        await client.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    return samples


async def run(quick: bool = False) -> dict[str, float]:
    n = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="megaflow-bench-repo-") as tmp:
        root = Path(tmp)
        make_repository(root / "repo", FILES, FILE_BYTES)
        make_repository(root / "small", SMALL_FILES, FILE_BYTES)
        store = BlobStore(root / "store")
        t0 = time.perf_counter()
        digest = store.pack_directory(root / "repo")
        pack_s = time.perf_counter() - t0
        small_digest = store.pack_directory(root / "small")
        inline_files = _inline(root / "repo")
        commit = _git_repository(root / "repo")
        by_artifact = common_pb2.WorkspaceSource(artifact=digest)
        by_git = common_pb2.WorkspaceSource(
            git=common_pb2.GitSource(url=str(root / "repo"), commit=commit)
        )
        sizes = {
            "task_artifact": common_pb2.TaskSpec(task_id="t", workspace=by_artifact).ByteSize(),
            "task_git": common_pb2.TaskSpec(task_id="t", workspace=by_git).ByteSize(),
            "task_inline": common_pb2.TaskSpec(task_id="t", files=inline_files).ByteSize(),
            "create_artifact": env_pb2.CreateEnvironmentRequest(workspace=by_artifact).ByteSize(),
            "create_git": env_pb2.CreateEnvironmentRequest(workspace=by_git).ByteSize(),
            "create_inline": env_pb2.CreateEnvironmentRequest(files=inline_files).ByteSize(),
        }
        del inline_files
        small_inline = _inline(root / "small")
        config = EnvServiceConfig(
            root_dir=root / "sb",
            artifact_dir=root / "store",
            artifact_cache_dir=root / "cache",
            setup_timeout_s=CREATE_TIMEOUT_S,
        )
        async with (
            SandboxEnvironmentService(config) as service,
            GrpcServer("127.0.0.1:0", {"env": service}) as server,
        ):
            client = EnvironmentServiceClient(server.address)
            blobs, mirrors = service.workspaces.blobs.dir, service.workspaces.git.dir

            def drop_blobs() -> None:
                shutil.rmtree(blobs, ignore_errors=True)

            def drop_mirrors() -> None:
                shutil.rmtree(mirrors, ignore_errors=True)

            artifact = env_pb2.CreateEnvironmentRequest(owner="bench", workspace=by_artifact)
            git = env_pb2.CreateEnvironmentRequest(owner="bench", workspace=by_git)
            small_artifact = env_pb2.CreateEnvironmentRequest(
                owner="bench", workspace=common_pb2.WorkspaceSource(artifact=small_digest)
            )
            small = env_pb2.CreateEnvironmentRequest(owner="bench", files=small_inline)
            empty = env_pb2.CreateEnvironmentRequest(owner="bench")
            times = {
                "empty": summarise("empty", await _creates(client, empty, n)),
                "artifact_uncached": summarise(
                    "a0", await _creates(client, artifact, n, drop_blobs)
                ),
                "artifact_cached": summarise("a1", await _creates(client, artifact, n)),
                "git_uncached": summarise("g0", await _creates(client, git, n, drop_mirrors)),
                "git_cached": summarise("g1", await _creates(client, git, n)),
                "small_inline": summarise("s0", await _creates(client, small, n)),
                "small_artifact_cached": summarise(
                    "s1", (await _creates(client, small_artifact, n + 1))[1:]
                ),
            }
            await client.close()
    size_rows = [
        (
            f"{what}, {FILES} files / {FILES * FILE_BYTES / 2**20:.0f} MiB",
            f"{sizes[f'{what}_artifact']:,} B",
            f"{sizes[f'{what}_git']:,} B",
            f"{sizes[f'{what}_inline']:,} B",
        )
        for what in ("task", "create")
    ]
    print_table(
        "repository message sizes", size_rows, ("message", "artifact", "git", "inline files")
    )
    mib = FILES * FILE_BYTES / 2**20
    labels = {
        "empty": "CreateEnvironment, no repository (gRPC)",
        "artifact_uncached": f"{mib:.0f} MiB artifact, host cache empty",
        "artifact_cached": f"{mib:.0f} MiB artifact, cached",
        "git_uncached": f"{mib:.0f} MiB git commit, no mirror",
        "git_cached": f"{mib:.0f} MiB git commit, mirror cached",
        "small_inline": f"baseline: {mib / 10:.0f} MiB inline files",
        "small_artifact_cached": f"{mib / 10:.0f} MiB artifact, cached",
    }
    rows = [(labels[k], ms(v["p50"]), ms(v["p99"])) for k, v in times.items()]
    rows.append((f"pack the {mib:.0f} MiB folder into the store (once)", ms(pack_s), ""))
    print_table(
        f"CreateEnvironment with a repository (gRPC loopback, {n} each; inline limit "
        f"{MAX_FILES_BYTES // 2**20} MiB)",
        rows,
        ("create", "p50", "p99"),
    )
    figures: dict[str, float] = {f"bytes_{k}": float(v) for k, v in sizes.items()}
    figures |= {f"create_{k}_p50_ms": v["p50"] * 1000 for k, v in times.items()}
    figures["pack_ms"] = pack_s * 1000
    return figures
