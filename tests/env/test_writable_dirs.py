"""Extra writable folders of local sandboxes (`LocalBackendConfig.writable_dirs`): what
Harbor tasks need (/logs, /tests, /solution) on a read-only root, private per sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.local import LocalSandbox
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.v1 import env_pb2


@pytest.mark.parametrize(
    "bad", ["logs", "/", "/workspace", "/workspace/x", "/tmp", "/proc/x", "/a/../b", "/run"]
)
def test_bad_writable_dirs_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="writable_dirs"):
        LocalSandbox("wd", root_dir=tmp_path, writable_dirs=(bad,))


async def test_writable_dirs_are_private_to_each_sandbox(tmp_path: Path) -> None:
    config = EnvServiceConfig(
        root_dir=tmp_path / "sb", backends={"local": {"writable_dirs": ["/logs", "/a/b"]}}
    )
    service = SandboxEnvironmentService(config)
    await service.start()
    try:
        ids = []
        for n in range(2):
            made = await service.create_environment(env_pb2.CreateEnvironmentRequest(owner=f"o{n}"))
            ids.append(made.env_id)
            out = await service.execute_step(
                env_pb2.ExecuteStepRequest(
                    env_id=made.env_id,
                    command=f"mkdir -p /logs/v && echo {n} > /logs/v/r && echo x > /a/b/f && "
                    "cat /a/b/f; touch /etc/nope",
                )
            )
            assert out.output.startswith("x\n"), out.output
            assert "Read-only file system" in out.output  # the rest of the root stays so
        for n, env_id in enumerate(ids):
            out = await service.execute_step(
                env_pb2.ExecuteStepRequest(env_id=env_id, command="cat /logs/v/r")
            )
            assert out.output == f"{n}\n"
            await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    finally:
        await service.stop()
    assert not [p for p in (tmp_path / "sb").iterdir() if (p / "owner.json").exists()]
