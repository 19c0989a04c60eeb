"""Hostile use of the environment lifecycle: leave traps for the next tenant of a
pooled (persistent) sandbox, and abuse snapshots (URIs outside the store, archives
carrying setuid binaries and symlinks to host folders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.v1 import common_pb2, env_pb2
from tests.security import hoststate
from tests.security.backends import sandbox_containers
from tests.security.conftest import Arena, eventually

pytestmark = pytest.mark.integration

PERSISTENT = common_pb2.EnvPlacement(mode="persistent")


@pytest.mark.only_backends(
    "local",
    "docker",
    reason="finds the sandbox's processes on the host by their command line: gVisor's run "
    "inside its Sentry, invisible to the host (the arena checks its containers are gone)",
)
async def test_persistent_sandbox_leaves_nothing_to_next_tenant(arena: Arena) -> None:
    service, tag = arena.service, f"trap-{arena.marker}"
    first = (
        await service.create_environment(arena.request(owner="attacker", placement=PERSISTENT))
    ).env_id
    folders = {p.name for p in service.config.root_dir.iterdir()}
    containers = _containers(arena)
    r = await arena.step(
        f"echo evil > planted; echo evil > /tmp/planted; export EVIL_{arena.marker}=1; "
        "mkdir -p locked/x && touch locked/x/f && chmod 000 locked; "
        f"(setsid sh -c 'sleep 1000; : {tag}' >/dev/null 2>&1 &); "
        "echo 'echo hijacked' > .bashrc; cd /tmp",
        env_id=first,
    )
    assert r.exit_code == 0, r.output
    assert await eventually(lambda: hoststate.host_pids_with(tag)), "the trap did not start"
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=first))
    # The reset runs in the background after the release returns.
    assert await eventually(lambda: not hoststate.host_pids_with(tag)), "the trap survived"
    assert await eventually(lambda: service.pool.idle == 1), "the sandbox was not pooled"
    second = (
        await service.create_environment(arena.request(owner="next-tenant", placement=PERSISTENT))
    ).env_id
    assert {p.name for p in service.config.root_dir.iterdir()} == folders, "not reused"
    assert _containers(arena) == containers, "not reused"
    seen = await arena.step(
        "pwd; ls -A /workspace /tmp; /usr/bin/ps -e --no-headers | wc -l; env | grep -c EVIL_",
        env_id=second,
    )
    # Processes: init, the shell, ps and wc (Docker: also its `sleep infinity`).
    count = "4" if arena.backend == "local" else "5"
    assert seen.output.split() == ["/workspace", "/tmp:", "/workspace:", count, "0"], seen.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "uri",
    ["../../root/x.tar", "/etc/x.tar", "file:///root/x.tar", "{store}/../escape.tar"],
    ids=["dotdot", "absolute", "file_url", "dotdot_from_store"],
)
async def test_snapshot_outside_the_store(arena: Arena, uri: str) -> None:
    store = arena.service.config.artifact_dir
    target = uri.format(store=store)
    with pytest.raises(InvalidRequestError, match="outside the store"):
        await arena.service.snapshot_environment(
            env_pb2.SnapshotEnvironmentRequest(env_id=arena.attacker, uri=target)
        )
    with pytest.raises(InvalidRequestError, match="outside the store"):
        await arena.service.create_environment(arena.request(owner="evil", restore_from=target))
    for path in ("/root/x.tar", "/etc/x.tar", str(store.parent / "escape.tar")):
        assert not Path(path).exists()
    await arena.assert_contained()


async def test_restore_of_hostile_workspace_snapshot(arena: Arena) -> None:
    r = await arena.step(
        f"ln -s /root rootlink && ln -s {arena.host_dir} hostlink && "
        "cp /bin/bash suidsh && chmod 4755 suidsh && echo hi > plain"
    )
    assert r.exit_code == 0, r.output
    snap = await arena.service.snapshot_environment(
        env_pb2.SnapshotEnvironmentRequest(env_id=arena.attacker)
    )
    restored = (
        await arena.service.create_environment(
            arena.request(owner="restored", restore_from=snap.uri)
        )
    ).env_id
    r = await arena.step(
        f"cat plain; stat -c %A suidsh; readlink hostlink; ls hostlink/ rootlink/; "
        f"echo pwned > hostlink/{arena.pwn}",
        env_id=restored,
    )
    assert r.exit_code != 0
    lines = r.output.splitlines()
    assert lines[:3] == ["hi", "-rwxr-xr-x", str(arena.host_dir)], r.output  # setuid gone
    assert "secret.txt" not in r.output
    await arena.assert_contained()


def _containers(arena: Arena) -> set[str]:
    """Docker: the sandbox ids of the sandbox containers (empty for the local backend).

    A pooled Docker sandbox is reset by recreating its container from the image, so the
    same sandbox (its id label) comes back in a new container."""
    if arena.dockerd is None:
        return set()
    return {
        str(c["Config"]["Labels"]["megaflow.sandbox_id"]) for c in sandbox_containers(arena.dockerd)
    }
