"""Hostile network actions: reach the host's own listener, resolve names, connect out,
reach another sandbox's server. Each sandbox has its own network namespace (only
``lo``, no route), so every attempt fails and the test's listener sees nothing."""

from __future__ import annotations

import pytest

from tests.security.conftest import Arena, failed, host_global_ipv4

pytestmark = pytest.mark.integration

CONNECT = (
    "python3 -c 'import socket,sys; "
    "s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); "
    's.sendall(b"pwned"); print("connected")\' {host} {port}'
)


@pytest.mark.parametrize("how", ["python_socket", "bash_dev_tcp", "curl"])
async def test_reach_host_loopback_listener(arena: Arena, how: str) -> None:
    port = arena.listener_port
    command = {
        "python_socket": CONNECT.format(host="127.0.0.1", port=port),
        "bash_dev_tcp": arena.bash(f"echo pwned > /dev/tcp/127.0.0.1/{port}"),
        "curl": f"curl -sS -m 3 http://127.0.0.1:{port}/",
    }[how]
    r = await arena.step(command)
    assert failed(r)
    assert "connected" not in r.output
    assert any(m in r.output.lower() for m in ("refused", "failed to connect")), r.output
    await arena.assert_contained()


async def test_reach_host_global_address(arena: Arena) -> None:
    addresses = host_global_ipv4() or ["192.0.2.2"]
    for address in addresses:
        r = await arena.step(CONNECT.format(host=address, port=arena.listener_port))
        assert failed(r)
        # gVisor's netstack (no route but loopback) answers EHOSTUNREACH
        assert "Network is unreachable" in r.output or (
            arena.backend == "gvisor" and "No route to host" in r.output
        ), r.output
    await arena.assert_contained()


@pytest.mark.parametrize(
    "command",
    [
        "getent hosts example.com",
        "python3 -c 'import socket; print(socket.getaddrinfo(\"pypi.org\", 443))'",
        "curl -sS -m 3 https://pypi.org/simple/",
    ],
    ids=["getent", "getaddrinfo", "curl_https"],
)
async def test_dns_resolution_fails(arena: Arena, command: str) -> None:
    r = await arena.step(command)
    assert failed(r)
    assert "pypi.org" not in r.output or "resolve" in r.output.lower(), r.output
    await arena.assert_contained()


@pytest.mark.parametrize("target", ["1.1.1.1:53", "8.8.8.8:443", "nameserver_of_resolv_conf"])
async def test_outbound_connect_fails(arena: Arena, target: str) -> None:
    if target == "nameserver_of_resolv_conf":
        host = "$(awk '/^nameserver/{print $2; exit}' /etc/resolv.conf)"
        command = CONNECT.format(host=host, port=53)
    else:
        host, port = target.split(":")
        command = CONNECT.format(host=host, port=port)
    r = await arena.step(command)
    assert failed(r)
    assert "connected" not in r.output
    await arena.assert_contained()


async def test_interfaces_and_routes_are_private(arena: Arena) -> None:
    r = await arena.step(
        "ls /sys/class/net 2>/dev/null; ip -o link | awk '{print $2}'; "
        "tail -n +2 /proc/net/route | grep ."
    )
    assert failed(r)  # no route at all
    assert "lo:" in r.output
    assert "eth0" not in r.output
    await arena.assert_contained()


async def test_reach_victim_sandbox_server(arena: Arena) -> None:
    victim = arena.victim.env_id
    serve = (
        "nohup python3 -c 'import socket,time; s=socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        's.bind(("127.0.0.1", 47011)); s.listen(); time.sleep(60)\' >/dev/null 2>&1 & '
        "for i in $(seq 100); do "
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 47011))' "
        "2>/dev/null && break; sleep 0.05; done; "
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 47011))'"
    )
    r = await arena.step(serve, env_id=victim)
    assert r.exit_code == 0, r.output  # the victim reaches its own server
    attack = await arena.step(CONNECT.format(host="127.0.0.1", port=47011))
    assert failed(attack)
    assert "refused" in attack.output.lower(), attack.output
    await arena.assert_contained()
