"""The Environment Service over real sandboxes: the step API, scoring, leases."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megaflow.agent.session import AgentLimits, TaskSession
from megaflow.core.errors import (
    CancelledTaskError,
    CapacityError,
    InvalidRequestError,
    NotFoundError,
)
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.service import ModelServiceImpl
from megaflow.rpc.clients import EnvironmentServiceClient
from megaflow.rpc.server import GrpcServer
from megaflow.tasks.swe_synth import generate_tasks, reference_patch, wrong_patch
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, env_pb2
from tests.env.test_pools import _sandbox_pids

pytestmark = pytest.mark.integration


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[SandboxEnvironmentService]:
    svc = SandboxEnvironmentService(
        EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=4, reap_interval_s=0.1)
    )
    async with svc:
        yield svc
    assert not any((tmp_path / "sb").iterdir())


def _create(task: common_pb2.TaskSpec, **kw: float | str) -> env_pb2.CreateEnvironmentRequest:
    return env_pb2.CreateEnvironmentRequest(
        owner="test",
        image=task.image,
        files=task.files,
        hidden_files=task.hidden_files,
        eval_command=task.eval_command,
        **kw,
    )


async def _score(
    svc: SandboxEnvironmentService, task: common_pb2.TaskSpec, patch: tuple[str, str, str]
) -> float:
    env_id = (await svc.create_environment(_create(task))).env_id
    path, old, new = patch
    edit = await svc.submit_action(
        env_pb2.SubmitActionRequest(
            env_id=env_id, edit_file=env_pb2.EditFile(path=path, old=old, new=new)
        )
    )
    assert edit.ok, edit.message
    reply = await svc.submit_action(
        env_pb2.SubmitActionRequest(env_id=env_id, submit=env_pb2.Submit())
    )
    await svc.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
    assert reply.has_reward
    return reply.reward


async def test_hidden_tests_decide_the_reward(service: SandboxEnvironmentService) -> None:
    task = generate_tasks(1, seed=11)[0]
    assert await _score(service, task, reference_patch(task)) == 1.0
    assert await _score(service, task, wrong_patch(task)) == 0.0


async def test_hidden_tests_are_invisible_before_submit(service: SandboxEnvironmentService) -> None:
    task = generate_tasks(1, seed=5)[0]
    env_id = (await service.create_environment(_create(task))).env_id
    listing = await service.execute_step(
        env_pb2.ExecuteStepRequest(env_id=env_id, command="find . -type f")
    )
    for hidden in task.hidden_files:
        assert hidden not in listing.output
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_step_api_over_grpc(service: SandboxEnvironmentService) -> None:
    task = generate_tasks(1, seed=2)[0]
    async with GrpcServer("127.0.0.1:0", {"env": service}) as server:
        client = EnvironmentServiceClient(server.address)
        env_id = (await client.create_environment(_create(task))).env_id
        step = await client.execute_step(
            env_pb2.ExecuteStepRequest(env_id=env_id, command="cd tests && export X=42")
        )
        assert step.exit_code == 0
        step = await client.execute_step(
            env_pb2.ExecuteStepRequest(env_id=env_id, command="echo $X; pwd")
        )
        assert step.output.split() == ["42", "/workspace/tests"]
        obs = await client.get_observation(env_pb2.GetObservationRequest(env_id=env_id))
        assert obs.alive and obs.cwd == "/workspace/tests" and obs.steps == 2
        wrote = await client.submit_action(
            env_pb2.SubmitActionRequest(
                env_id=env_id, write_file=env_pb2.WriteFile(path="notes.txt", content=b"hi")
            )
        )
        assert wrote.ok
        read = await client.submit_action(
            env_pb2.SubmitActionRequest(env_id=env_id, read_file=env_pb2.ReadFile(path="notes.txt"))
        )
        assert read.content == b"hi"
        missing = await client.submit_action(
            env_pb2.SubmitActionRequest(
                env_id=env_id, edit_file=env_pb2.EditFile(path="notes.txt", old="absent", new="x")
            )
        )
        assert not missing.ok and "not found" in missing.message
        with pytest.raises(InvalidRequestError, match="empty"):
            await client.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="  "))
        await client.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
        with pytest.raises(NotFoundError):
            await client.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="true"))
        await client.close()


async def test_bad_paths_and_images_are_rejected(service: SandboxEnvironmentService) -> None:
    with pytest.raises(InvalidRequestError, match="inside the workspace"):
        await service.create_environment(env_pb2.CreateEnvironmentRequest(files={"../x": b""}))
    with pytest.raises(InvalidRequestError, match="image"):
        await service.create_environment(env_pb2.CreateEnvironmentRequest(image="ubuntu:22.04"))


async def test_capacity_is_a_hard_cap(service: SandboxEnvironmentService) -> None:
    created = await asyncio.gather(
        *(service.create_environment(env_pb2.CreateEnvironmentRequest()) for _ in range(4))
    )
    with pytest.raises(CapacityError):
        await service.create_environment(env_pb2.CreateEnvironmentRequest())
    for c in created:
        await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=c.env_id))


async def test_expired_lease_releases_the_sandbox(service: SandboxEnvironmentService) -> None:
    created = await service.create_environment(env_pb2.CreateEnvironmentRequest(lease_s=0.2))
    await asyncio.sleep(0.6)
    with pytest.raises(NotFoundError):
        await service.execute_step(
            env_pb2.ExecuteStepRequest(env_id=created.env_id, command="true")
        )


async def _run(svc: SandboxEnvironmentService, env_id: str, command: str) -> str:
    reply = await svc.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command=command))
    return reply.output


async def test_suspend_freezes_and_the_next_call_resumes(
    service: SandboxEnvironmentService,
) -> None:
    env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
    if not getattr(service._envs[env_id].sandbox, "can_suspend", True):
        pytest.skip("this machine has no cgroup freezer")
    await _run(service, env_id, "(while :; do echo x >> ticks; sleep 0.02; done) >/dev/null 2>&1 &")
    ticks = service._envs[env_id].sandbox.host_workspace / "ticks"  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)
    await service.suspend_environment(env_pb2.SuspendEnvironmentRequest(env_id=env_id))
    await service.suspend_environment(env_pb2.SuspendEnvironmentRequest(env_id=env_id))  # idem
    frozen_at = ticks.read_bytes().count(b"x")
    await asyncio.sleep(0.3)
    assert ticks.read_bytes().count(b"x") == frozen_at  # nothing ran while suspended
    assert (await _run(service, env_id, "echo awake")).strip() == "awake"  # resumed
    await asyncio.sleep(0.3)
    assert ticks.read_bytes().count(b"x") > frozen_at
    await service.suspend_environment(env_pb2.SuspendEnvironmentRequest(env_id=env_id))
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


async def test_idle_environments_are_suspended_automatically(tmp_path: Path) -> None:
    config = EnvServiceConfig(root_dir=tmp_path / "sb", reap_interval_s=0.05, idle_suspend_s=0.1)
    async with SandboxEnvironmentService(config) as svc:
        env_id = (await svc.create_environment(env_pb2.CreateEnvironmentRequest())).env_id
        if not getattr(svc._envs[env_id].sandbox, "can_suspend", True):
            pytest.skip("this machine has no cgroup freezer")
        await asyncio.sleep(0.4)
        assert svc._envs[env_id].suspended
        assert (await _run(svc, env_id, "echo back")).strip() == "back"
        assert not svc._envs[env_id].suspended


@pytest.mark.parametrize("store", ["dir", "memory"])
async def test_snapshot_then_restore(tmp_path: Path, store: str) -> None:
    url = f"memory://snaps-{tmp_path.name}" if store == "memory" else ""
    config = EnvServiceConfig(
        root_dir=tmp_path / "sb", artifact_dir=tmp_path / "artifacts", artifact_url=url
    )
    task = generate_tasks(1, seed=3)[0]
    async with SandboxEnvironmentService(config) as svc:
        env_id = (await svc.create_environment(_create(task))).env_id
        await _run(svc, env_id, "mkdir -p work && echo progress > work/state.txt && rm -f README*")
        snap = await svc.snapshot_environment(env_pb2.SnapshotEnvironmentRequest(env_id=env_id))
        assert snap.bytes > 0
        if store == "dir":
            assert snap.uri.startswith(f"file://{tmp_path / 'artifacts'}/")
            assert Path(snap.uri.removeprefix("file://")).stat().st_size == snap.bytes
        else:
            assert snap.uri.startswith(url + "/")
        await svc.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
        restored = (await svc.create_environment(_create(task, restore_from=snap.uri))).env_id
        assert (await _run(svc, restored, "cat work/state.txt")).strip() == "progress"
        listing = await _run(svc, restored, "find . -type f | sort")
        assert "README" not in listing  # the snapshot's state, not the task's fresh files
        with pytest.raises(InvalidRequestError, match="outside the store"):
            await svc.snapshot_environment(
                env_pb2.SnapshotEnvironmentRequest(env_id=restored, uri="file:///etc/evil.tar")
            )
        with pytest.raises(InvalidRequestError, match="outside the store"):
            await svc.create_environment(_create(task, restore_from="file:///etc/passwd"))
        with pytest.raises(NotFoundError):
            await svc.create_environment(_create(task, restore_from=snap.uri + ".missing"))
        assert svc.live == 1  # failed creates hold no sandbox
        await svc.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=restored))
    assert not any((tmp_path / "sb").iterdir())


async def test_heartbeat_keeps_the_lease(service: SandboxEnvironmentService) -> None:
    env_id = (await service.create_environment(_create_plain(lease_s=0.3))).env_id
    for _ in range(6):
        await asyncio.sleep(0.1)
        await service.heartbeat(env_pb2.EnvHeartbeatRequest(env_id=env_id))
    assert (await _run(service, env_id, "echo kept")).strip() == "kept"
    await asyncio.sleep(0.6)  # no more heartbeats: the reaper releases it
    with pytest.raises(NotFoundError):
        await _run(service, env_id, "true")
    assert service.live == 0


def _create_plain(**kw: float) -> env_pb2.CreateEnvironmentRequest:
    return env_pb2.CreateEnvironmentRequest(owner="test", **kw)


_ORPHAN_MAKER = """
import asyncio, sys
from pathlib import Path
from megaflow.env.service import EnvServiceConfig, SandboxEnvironmentService
from megaflow.model.service import ModelServiceImpl
from megaflow.testing.simulated_model import SimulatedBackend
from megaflow.v1 import common_pb2, env_pb2

async def main() -> None:
    config = EnvServiceConfig(root_dir=Path(sys.argv[1]), warm_pool={"host": 2})
    svc = SandboxEnvironmentService(config)
    await svc.start()
    await svc.warmed()
    for mode in ("ephemeral", "persistent"):
        placement = common_pb2.EnvPlacement(mode=mode)
        request = env_pb2.CreateEnvironmentRequest(placement=placement)
        env_id = (await svc.create_environment(request)).env_id
        step = env_pb2.ExecuteStepRequest(env_id=env_id, command="(sleep 300 &)")
        await svc.execute_step(step)
    await svc.warmed()
    print(svc.live, flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


async def test_restart_reclaims_what_a_killed_service_left(tmp_path: Path) -> None:
    root = tmp_path / "sb"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ORPHAN_MAKER, str(root), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert int(line) == 4  # two in use, two pooled
    finally:
        proc.kill()
        await proc.wait()
    left = [d for d in root.iterdir()]
    assert len(left) == 4
    owners = [json.loads((d / "owner.json").read_text()) for d in left]
    cgroups = [Path(c) for o in owners for c in o.get("cgroups", [])]
    async with SandboxEnvironmentService(EnvServiceConfig(root_dir=root)) as svc:
        assert svc.live == 0
    assert not any(root.iterdir())
    assert not any(c.exists() for c in cgroups)
    for d in left:
        assert not _sandbox_pids(d / "workspace")


async def test_release_by_owner(service: SandboxEnvironmentService) -> None:
    mine = [
        (await service.create_environment(env_pb2.CreateEnvironmentRequest(owner="a1"))).env_id
        for _ in range(2)
    ]
    other = await service.create_environment(env_pb2.CreateEnvironmentRequest(owner="b1"))
    reply = await service.release_environment(env_pb2.ReleaseEnvironmentRequest(owner="a1"))
    assert reply.released == 2
    for env_id in mine:
        with pytest.raises(NotFoundError):
            await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command="true"))
    assert service.live == 1  # b1's is untouched
    none = await service.release_environment(env_pb2.ReleaseEnvironmentRequest(owner="a1"))
    assert none.released == 0
    for bad in (
        env_pb2.ReleaseEnvironmentRequest(),
        env_pb2.ReleaseEnvironmentRequest(env_id=other.env_id, owner="b1"),
    ):
        with pytest.raises(InvalidRequestError, match="exactly one"):
            await service.release_environment(bad)
    one = await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=other.env_id))
    assert one.released == 1 and service.live == 0


async def test_release_by_owner_undoes_a_create_in_flight(
    service: SandboxEnvironmentService,
) -> None:
    """An owner released while its create is still setting up (its caller gave up and
    will never learn the env id): the create is undone when it finishes, not left to
    the lease reaper. Another owner's create in flight is not touched."""

    def slow(owner: str) -> env_pb2.CreateEnvironmentRequest:
        return env_pb2.CreateEnvironmentRequest(owner=owner, setup_commands=["sleep 1"])

    mine = asyncio.create_task(service.create_environment(slow("gone")))
    theirs = asyncio.create_task(service.create_environment(slow("kept")))
    while service.live < 2:  # both hold a sandbox, still setting up
        await asyncio.sleep(0.01)
    reply = await service.release_environment(env_pb2.ReleaseEnvironmentRequest(owner="gone"))
    assert reply.released == 0  # nothing made yet
    with pytest.raises(CancelledTaskError, match="released its environments"):
        await mine
    kept = await theirs
    assert service.live == 1
    # the owner is forgotten once its creates are done: a later create of it stands
    again = await service.create_environment(env_pb2.CreateEnvironmentRequest(owner="gone"))
    assert service.live == 2
    for env_id in (kept.env_id, again.env_id):
        await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))


class _AnswersNever(SandboxEnvironmentService):
    """Makes the environment, then never answers (the answer lost in flight)."""

    made = asyncio.Event()

    async def create_environment(
        self, request: env_pb2.CreateEnvironmentRequest
    ) -> env_pb2.CreateEnvironmentResponse:
        await super().create_environment(request)
        self.made.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def _cancel_an_agent_when(
    svc: SandboxEnvironmentService, reached: asyncio.Event, timeout_s: float
) -> None:
    """Run one task's agent against `svc` over gRPC; cancel it when `svc` sets `reached`
    (with one sandbox held); then no sandbox may be left."""
    model = ModelServiceImpl([SimulatedBackend.fast()])
    task = generate_tasks(1, seed=2)[0]
    async with svc, GrpcServer("127.0.0.1:0", {"env": svc}) as server:
        client = EnvironmentServiceClient(server.address)
        agent = TaskSession(task, "attempt-1", env=client, model=model, limits=AgentLimits())
        run = asyncio.ensure_future(agent.run())
        await asyncio.wait_for(reached.wait(), timeout_s)
        assert svc.live == 1
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert svc.live == 0
        await client.close()
    await model.stop()


async def test_an_agent_cancelled_while_its_environment_is_made_leaves_none(
    tmp_path: Path,
) -> None:
    # (the lease, task timeout + scoring + 60 s, would have kept it for half an hour)
    _AnswersNever.made = asyncio.Event()
    svc = _AnswersNever(EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=2))
    await _cancel_an_agent_when(svc, _AnswersNever.made, 30)


class _SlowRelease(SandboxEnvironmentService):
    """Takes a moment to start releasing (a busy service)."""

    asked = asyncio.Event()

    async def release_environment(
        self, request: env_pb2.ReleaseEnvironmentRequest
    ) -> env_pb2.ReleaseEnvironmentResponse:
        self.asked.set()
        await asyncio.sleep(0.3)
        return await super().release_environment(request)


async def test_an_agent_cancelled_while_it_releases_still_releases(tmp_path: Path) -> None:
    """The attempt's caller goes away just as it finished and is releasing: the release
    call completes (then the cancellation is raised), not cut off in flight."""
    _SlowRelease.asked = asyncio.Event()
    svc = _SlowRelease(EnvServiceConfig(root_dir=tmp_path / "sb", max_environments=2))
    await _cancel_an_agent_when(svc, _SlowRelease.asked, 60)


async def test_a_cancelled_command_line_stops_where_it_was(
    service: SandboxEnvironmentService,
) -> None:
    """A step cancelled mid-command (its caller gone) stops the whole command line: the
    shell unwinds it as the running program is killed, so the rest of the line (here
    `echo b`) never runs. (Killing the program before signalling the shell let a busy
    machine run the rest first.)"""
    env_id = (await service.create_environment(env_pb2.CreateEnvironmentRequest(owner="t"))).env_id
    for i in range(5):
        line = f"echo a > a{i}; sleep 60; echo b > b{i}"
        step = asyncio.ensure_future(
            service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command=line))
        )
        await asyncio.sleep(0.05 * i)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        check = f"ls b{i} 2>&1; pgrep -x sleep || echo no sleep"
        reply = await service.execute_step(env_pb2.ExecuteStepRequest(env_id=env_id, command=check))
        assert "No such file" in reply.output and "no sleep" in reply.output, (i, reply.output)
    await service.release_environment(env_pb2.ReleaseEnvironmentRequest(env_id=env_id))
