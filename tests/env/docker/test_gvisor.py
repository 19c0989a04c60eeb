"""DockerSandbox under gVisor (runtime ``runsc``, ptrace platform). Few tests: it is slow."""

from __future__ import annotations

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.env.docker import DockerEngine, DockerSandbox
from megaflow.env.docker.hardening import CAPABILITIES
from megaflow.testing.dockerd import RUNSC, Dockerd
from tests.env.docker.conftest import IMAGE, Factory

CAP_NUMBERS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RUNSC.exists(), reason="runsc (Debian package runsc) not installed"),
]


async def test_runsc_sandbox_is_gvisor_and_works(dockerd: Dockerd, make_sandbox: Factory) -> None:
    assert dockerd.runsc
    sb: DockerSandbox = await make_sandbox(runtime="runsc")
    r = await sb.execute("dmesg", 20)
    assert "gVisor" in r.output
    with open("/proc/version") as f:
        host_version = f.read().strip()
    guest_version = (await sb.execute("cat /proc/version", 20)).output.strip()
    assert guest_version and guest_version != host_version
    await sb.execute("cd /tmp && export G=1", 20)
    assert (await sb.execute("echo $G $PWD", 20)).output == "1 /tmp\n"
    r = await sb.execute("sleep 30", 1)
    assert r.timed_out and r.exit_code == 137
    assert (await sb.execute("echo $G", 20)).output == "1\n"
    await sb.write_file("f.txt", b"gvisor")
    assert await sb.read_file("/workspace/f.txt") == b"gvisor"
    r = await sb.execute("cat /proc/net/dev", 20)
    assert [ln.split(":")[0].strip() for ln in r.output.splitlines() if ":" in ln] == ["lo"]


def test_memory_too_small_for_runsc_fails_clearly_at_create(engine: DockerEngine) -> None:
    with pytest.raises(InvalidRequestError, match="too small for gVisor"):
        DockerSandbox("tiny", engine=engine, image=IMAGE, runtime="runsc", memory_mib=16)


async def test_root_is_allowed_under_gvisor_with_few_capabilities(make_sandbox: Factory) -> None:
    sb: DockerSandbox = await make_sandbox(runtime="runsc", user="root")
    r = await sb.execute("id -u; grep CapBnd /proc/self/status; touch /etc/x && echo wrote", 20)
    lines = r.output.splitlines()
    assert lines[0] == "0" and lines[-1] == "wrote", r.output
    bounding = int(lines[1].split()[1], 16)
    assert bounding == sum(1 << CAP_NUMBERS[c] for c in CAPABILITIES), r.output
