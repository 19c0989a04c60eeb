"""DockerSandbox under gVisor (runtime ``runsc``, ptrace platform). Few tests: it is slow."""

from __future__ import annotations

import pytest

from megaflow.env.docker import DockerSandbox
from megaflow.testing.dockerd import RUNSC, Dockerd
from tests.env.docker.conftest import Factory

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
