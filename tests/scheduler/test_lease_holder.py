"""Whether a lease's holder may still run: only a gone process of this host is dead."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from megaflow.scheduler.recovery import holder_alive, new_holder


def test_a_holder_is_dead_only_when_its_process_on_this_host_is_gone() -> None:
    assert holder_alive(new_holder())  # this process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    assert not holder_alive(f"{host}/{child.pid}/abcd1234")
    assert holder_alive(f"another-host-{host}/{child.pid}/abcd1234")  # cannot tell: alive
    assert holder_alive(f"{host}/not-a-pid/x")
    assert holder_alive(f"{host}/{os.getppid()}/x")
