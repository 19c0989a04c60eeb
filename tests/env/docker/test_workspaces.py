"""Workspaces by reference on the Docker backend: the tree arrives through the sandbox's
``restore`` (it has no host folder to write into)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.blobs import BlobCache, BlobStore
from megaflow.env.repos import WorkspaceMaker
from megaflow.v1 import common_pb2, env_pb2
from tests.env.docker.conftest import Factory
from tests.env.test_repos import _git

pytestmark = pytest.mark.integration


def _maker(tmp_path: Path) -> tuple[BlobStore, WorkspaceMaker]:
    store = BlobStore(tmp_path / "store")
    return store, WorkspaceMaker(BlobCache(store, tmp_path / "cache", 1 << 30), tmp_path / "git")


def _request(source: common_pb2.WorkspaceSource) -> env_pb2.CreateEnvironmentRequest:
    return env_pb2.CreateEnvironmentRequest(workspace=source)


async def test_an_artifact_and_setup_commands_in_a_docker_sandbox(
    make_sandbox: Factory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "mod.py").write_text("X = 1\n")
    (repo / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (repo / "run.sh").chmod(0o755)
    store, maker = _maker(tmp_path)
    sandbox = await make_sandbox()
    source = common_pb2.WorkspaceSource(artifact=store.pack_directory(repo))
    await maker.make(sandbox, _request(source), 60)
    await maker.setup(sandbox, ["./run.sh > out.txt"], 30)
    result = await sandbox.execute("cat src/mod.py out.txt", 10)
    assert (result.exit_code, result.output) == (0, "X = 1\nran\n")
    with pytest.raises(InvalidRequestError, match="exited 3"):
        await maker.setup(sandbox, ["(exit 3)"], 30)


async def test_a_git_commit_in_a_docker_sandbox(make_sandbox: Factory, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("one\n")
    _git("init", "-q", cwd=work)
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", "one", cwd=work)
    sha = _git("rev-parse", "HEAD", cwd=work)
    _, maker = _maker(tmp_path)
    sandbox = await make_sandbox()
    source = common_pb2.WorkspaceSource(git=common_pb2.GitSource(url=str(work), commit=sha))
    await maker.make(sandbox, _request(source), 60)
    result = await sandbox.execute("cat a.txt .git/HEAD", 10)  # busybox: no git inside
    assert (result.exit_code, result.output) == (0, f"one\n{sha}\n")
