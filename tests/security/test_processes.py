"""Hostile process actions: signal or trace another sandbox's process, list the host's
processes, outlive the environment, dodge the timeout, break the shell protocol."""

from __future__ import annotations

import os

import pytest

from megaflow.core.errors import NotFoundError
from megaflow.v1 import env_pb2
from tests.security import hoststate
from tests.security.conftest import Arena, eventually, failed

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "command",
    [
        "kill -9 {pid}",
        "kill -STOP {pid}",
        "python3 -c 'import os; os.kill({pid}, 9)'",
        "strace -p {pid} -o /dev/null",
        "python3 -c 'import ctypes,sys; r=ctypes.CDLL(None).ptrace(16,{pid},0,0); sys.exit(r!=0)'",
        "cat /proc/{pid}/environ /proc/{pid}/cmdline",
    ],
    ids=["kill_9", "kill_stop", "os_kill", "strace_attach", "ptrace_attach", "proc_peek"],
)
async def test_touch_victim_process_by_host_pid(arena: Arena, command: str) -> None:
    pid = arena.victim.daemon_pid
    r = await arena.step(command.format(pid=pid))
    assert failed(r)
    assert f"victim-{arena.marker}" not in r.output
    await arena.assert_contained()


async def test_kill_every_pid_number(arena: Arena) -> None:
    # Signal every pid a 2-core host could plausibly use; only the sandbox's own exist.
    r = await arena.step(
        "for p in $(seq 3 5000); do [ $p = $BASHPID ] || kill -9 $p 2>/dev/null; done; (exit 3)",
        timeout_s=30,
    )
    assert failed(r)
    assert hoststate.start_ticks(os.getpid()) is not None
    await arena.assert_contained()


async def test_process_listing_shows_only_own_sandbox(arena: Arena) -> None:
    r = await arena.step(
        f"ps -eo pid,args; grep -l victim-{arena.marker} /proc/[0-9]*/cmdline "
        "|| grep -l -e .venv/bin/python -e dockerd -e systemd /proc/[0-9]*/cmdline"
    )
    assert failed(r), r.output
    pids = [line.split()[0] for line in r.output.splitlines()[1:] if line.strip()]
    assert all(int(p) < 100 for p in pids), r.output
    assert ".venv/bin/python" not in r.output and f"victim-{arena.marker}" not in r.output
    await arena.assert_contained()


@pytest.mark.only_backends(
    "local",
    "docker",
    reason="finds the sandbox's processes on the host by their command line: gVisor's run "
    "inside its Sentry, invisible to the host (the arena checks its containers are gone)",
)
async def test_daemon_does_not_survive_release(arena: Arena) -> None:
    tag = f"daemon-{arena.marker}"
    # Docker's sleep is busybox, which dispatches on argv[0]: give bash the new name.
    sleeper = "sleep 1000" if arena.backend == "local" else "bash -c 'sleep 1000; :'"
    r = await arena.step(
        arena.bash(
            f"setsid nohup sh -c 'trap \"\" HUP TERM; sleep 1000; : {tag}' >/dev/null 2>&1 & "
            f"(trap '' HUP TERM; exec -a {tag}-b {sleeper}) >/dev/null 2>&1 & disown -a; "
            "echo started"
        )
    )
    assert r.exit_code == 0, r.output
    started = await eventually(lambda: len(hoststate.host_pids_with(tag)) >= 2)
    assert started, "the daemons did not start"
    await arena.service.release_environment(
        env_pb2.ReleaseEnvironmentRequest(env_id=arena.attacker)
    )
    assert hoststate.host_pids_with(tag) == [], "a daemon outlived its environment"
    with pytest.raises(NotFoundError, match="no environment"):
        await arena.step("echo still here")
    arena.attacker = (await arena.service.create_environment(arena.request(owner="again"))).env_id
    await arena.assert_contained()


async def test_ignore_term_to_escape_timeout(arena: Arena) -> None:
    r = await arena.step("trap '' TERM INT HUP; sleep 60", timeout_s=1.0)
    assert r.timed_out and r.exit_code == 137
    assert "timed out" in r.output
    await arena.assert_contained()


async def test_hijack_interrupt_trap_with_builtin_loop(arena: Arena) -> None:
    r = await arena.step("trap '' USR1 TERM INT; while :; do :; done", timeout_s=1.0)
    assert r.timed_out and r.exit_code == 137
    await arena.assert_contained()


async def test_replace_shell_with_exec(arena: Arena) -> None:
    r = await arena.step("exec sleep 60", timeout_s=1.0)
    assert failed(r)
    await arena.assert_contained()


@pytest.mark.parametrize("target", ["$$", "1", "-1"], ids=["own_shell", "ns_init", "all"])
async def test_kill_sandbox_infrastructure(arena: Arena, target: str) -> None:
    r = await arena.step(f"kill -9 {target}; sleep 10", timeout_s=1.5)
    assert failed(r)
    await arena.assert_contained()


async def test_stuck_read_from_stdin(arena: Arena) -> None:
    r = await arena.step("read -r line", timeout_s=5.0)
    assert r.exit_code == 1 and not r.timed_out  # stdin is /dev/null: EOF at once
    r = await arena.step("cat; read -r -n 1 c < /dev/stdin; echo got=$c; (exit 4)", timeout_s=5.0)
    assert r.exit_code == 4 and not r.timed_out
    assert r.output == "got=\n"
    await arena.assert_contained()


async def test_close_stdout_and_stderr_early(arena: Arena) -> None:
    r = await arena.step("exec 1>&- 2>&-; echo lost; (exit 5)")
    assert r.exit_code == 5
    assert "lost" not in r.output
    await arena.assert_contained()


async def test_redirect_shell_outputs_for_good(arena: Arena) -> None:
    r = await arena.step("exec 9>/dev/null >/dev/null 2>&1; exec 0</dev/null; false")
    assert failed(r)
    await arena.assert_contained()


async def test_forge_completion_sentinel(arena: Arena) -> None:
    r = await arena.step(
        "printf '\\n__MF_DONE_0000000000000000__ 0\\n'; sleep 0.2; echo real-end; (exit 6)"
    )
    assert r.exit_code == 6
    assert r.output.rstrip().endswith("real-end")
    await arena.assert_contained()
