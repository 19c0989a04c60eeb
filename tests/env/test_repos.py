"""Workspaces by reference (artifacts and git) and setup commands, on real sandboxes."""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.core.errors import DeadlineExceededError, InvalidRequestError
from megaflow.env.blobs import BlobStore
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.v1 import common_pb2, env_pb2

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, **kw: object) -> EnvServiceConfig:
    return EnvServiceConfig(
        root_dir=tmp_path / "sb",
        artifact_dir=tmp_path / "store",
        artifact_cache_dir=tmp_path / "cache",
        max_environments=4,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[SandboxEnvironmentService]:
    async with SandboxEnvironmentService(_config(tmp_path)) as svc:
        yield svc
    assert not any((tmp_path / "sb").iterdir())


async def _run(svc: SandboxEnvironmentService, env_id: str, command: str) -> str:
    step = await svc.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command=command))
    assert step.exit_code == 0, step.output
    return step.output


async def _create(svc: SandboxEnvironmentService, **kw: object) -> str:
    request = env_pb2.CreateEnvironmentRequest(owner="t", **kw)  # type: ignore[arg-type]
    return (await svc.create_environment(request)).env_id


def _git(*argv: str, cwd: Path | None = None) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": "/usr/bin:/bin",
        "HOME": str(cwd or "/"),
    }
    done = subprocess.run(
        ["git", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def _commit(work: Path, text: str) -> str:
    (work / "version.txt").write_text(text)
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", text, cwd=work)
    _git("push", "-q", "origin", "HEAD:main", cwd=work)
    return _git("rev-parse", "HEAD", cwd=work)


@pytest.fixture
def bare_repo(tmp_path: Path) -> tuple[Path, Path]:
    """(a bare repository, a clone of it to commit from)."""
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    _git("init", "-q", "--bare", "-b", "main", str(bare))
    _git("clone", "-q", str(bare), str(work))
    return bare, work


async def test_an_artifact_becomes_the_workspace(
    service: SandboxEnvironmentService, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "mod.py").write_text("X = 1\n")
    (repo / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (repo / "run.sh").chmod(0o755)
    digest = BlobStore(tmp_path / "store").pack_directory(repo)
    env_id = await _create(
        service,
        workspace=common_pb2.WorkspaceSource(artifact=digest),
        files={"src/mod.py": b"X = 2\n", "extra.txt": b"e"},  # files go over the repository
    )
    assert await _run(service, env_id, "./run.sh") == "ran\n"
    assert await _run(service, env_id, "cat src/mod.py extra.txt") == "X = 2\ne"
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_a_git_commit_becomes_the_workspace(
    service: SandboxEnvironmentService, bare_repo: tuple[Path, Path]
) -> None:
    bare, work = bare_repo
    first, second = _commit(work, "one"), _commit(work, "two")
    for commit, text in ((first, "one"), (second, "two"), ("", "two")):
        git = common_pb2.GitSource(url=str(bare), commit=commit)
        env_id = await _create(service, workspace=common_pb2.WorkspaceSource(git=git))
        assert await _run(service, env_id, "cat version.txt") == text
        head = await _run(service, env_id, "git rev-parse HEAD && git log --format=%H | wc -l")
        assert head.split() == [commit or second, "1"]  # that commit only: no later history
        assert await _run(service, env_id, "git status --porcelain") == ""
        await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    third = _commit(work, "three")  # not in the host's mirror yet: fetched on demand
    git = common_pb2.GitSource(url=f"file://{bare}", commit=third[:12])
    env_id = await _create(service, workspace=common_pb2.WorkspaceSource(git=git))
    assert await _run(service, env_id, "cat version.txt; git rev-parse HEAD") == f"three{third}\n"
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    assert service.workspaces.git.clones == 2  # one per URL (the path, then file://)


async def test_setup_commands_run_in_order_in_the_workspace(
    service: SandboxEnvironmentService,
) -> None:
    env_id = await _create(
        service,
        files={"a.txt": b"a"},
        setup_commands=["cp a.txt b.txt && mkdir -p sub && cd sub", "export READY=yes"],
    )
    assert await _run(service, env_id, "pwd; cat b.txt; echo $READY") == "/workspace\nayes\n"
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_a_failing_setup_command_is_a_final_error_with_its_output(
    service: SandboxEnvironmentService,
) -> None:
    broken = "echo broken-install >&2; false"
    with pytest.raises(InvalidRequestError, match=f"2/2 '{broken}' exited 1") as caught:
        await _create(service, setup_commands=["echo step-one", broken])
    assert "broken-install" in str(caught.value) and not caught.value.retryable
    assert service.live == 0


async def test_setup_past_its_budget_is_a_deadline_error(tmp_path: Path) -> None:
    async with SandboxEnvironmentService(_config(tmp_path)) as svc:
        with pytest.raises(DeadlineExceededError) as caught:
            await _create(svc, setup_commands=["sleep 30"], setup_timeout_s=1.0)
        assert caught.value.retryable and "budget" in str(caught.value)
        assert svc.live == 0


async def test_bad_sources_are_clear_errors(
    service: SandboxEnvironmentService, bare_repo: tuple[Path, Path], tmp_path: Path
) -> None:
    bare, work = bare_repo
    _commit(work, "one")
    cases = [
        (common_pb2.WorkspaceSource(artifact="sha256:abc"), "not a digest"),
        (common_pb2.WorkspaceSource(artifact="sha256:" + "0" * 64), "not in the store"),
        (common_pb2.WorkspaceSource(), "names no source"),
        (
            common_pb2.WorkspaceSource(git=common_pb2.GitSource(url=str(tmp_path / "nowhere"))),
            "cannot clone",
        ),
        (
            common_pb2.WorkspaceSource(git=common_pb2.GitSource(url="--upload-pack=touch /x")),
            "not a repository",
        ),
        (
            common_pb2.WorkspaceSource(git=common_pb2.GitSource(url=str(bare), commit="f" * 40)),
            "not in",
        ),
    ]
    for source, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            await _create(service, workspace=source)
    assert service.live == 0


async def test_concurrent_creates_fetch_an_uncached_artifact_once(
    service: SandboxEnvironmentService, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for i in range(200):
        (repo / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    digest = BlobStore(tmp_path / "store").pack_directory(repo)
    source = common_pb2.WorkspaceSource(artifact=digest)
    env_ids = await asyncio.gather(*(_create(service, workspace=source) for _ in range(3)))
    assert service.workspaces.blobs.fetches == 1
    expected = await _run(service, env_ids[0], "echo 200; yes 'file 199' | head -100 | sha256sum")
    for env_id in env_ids:
        listing = await _run(service, env_id, "ls | wc -l; cat f199.txt | sha256sum")
        assert listing == expected
        await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_an_extraction_past_the_budget_stops_before_the_sandbox_goes(
    tmp_path: Path,
) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for i in range(40_000):
            member = tarfile.TarInfo(f"d{i // 1000}/f{i}")
            member.size = 1
            tar.addfile(member, io.BytesIO(b"x"))
    digest = BlobStore(tmp_path / "store").put_bytes(archive.getvalue())
    source = common_pb2.WorkspaceSource(artifact=digest)
    async with SandboxEnvironmentService(_config(tmp_path)) as svc:
        await svc.workspaces.blobs.fetch(source.artifact, 60)  # cached: the budget goes on
        with pytest.raises(DeadlineExceededError):  # extracting 40,000 files
            await _create(svc, workspace=source, setup_timeout_s=1.0)
        # the extracting thread stopped before the sandbox was removed: nothing recreated
        assert svc.live == 0 and not any((tmp_path / "sb").iterdir())
