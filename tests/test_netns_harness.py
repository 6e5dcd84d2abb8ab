"""tests/netns.py: hosts in network namespaces reach each other, shaping and isolation are real.

Skipped where namespaces can't be made (not root, no iproute2...), unless MPC_FT_REQUIRE_NETNS=1,
which turns the skip into a failure. The whole file takes a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import netns
from tests.netns import Host, isolated_hosts, require_netns

PORT = 5555  # every namespace has its own ports, so a fixed one is fine

# argv: address port mode. Accepts one connection, reads to EOF, answers with the bytes read
# ("echo") or their count ("count").
SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = srv.accept()
data = b"".join(iter(lambda: conn.recv(1 << 16), b""))
conn.sendall(data if sys.argv[3] == "echo" else str(len(data)).encode())
conn.close()
"""

# argv: address port nbytes [timeout]. Sends nbytes, reads the answer to EOF and prints
# {"seconds", "reply"} as JSON.
CLIENT = """
import json, socket, sys, time
payload = (b"mpc-ft!" * (int(sys.argv[3]) // 7 + 1))[: int(sys.argv[3])]
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
start = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout) as sock:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reply = b"".join(iter(lambda: sock.recv(1 << 16), b""))
print(json.dumps({"seconds": time.monotonic() - start, "reply": reply.decode()}))
"""


def _serve(host: Host, mode: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        host.command([sys.executable, "-c", SERVER, host.address, str(PORT), mode]),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline() == "ready\n"
    return server


def _send(client: Host, server: Host, nbytes: int, mode: str = "count") -> dict:
    """Sends `nbytes` from `client` to a fresh server on `server`; the client's JSON report."""
    srv = _serve(server, mode)
    try:
        argv = [sys.executable, "-c", CLIENT, server.address, str(PORT), str(nbytes)]
        out = subprocess.run(client.command(argv), capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert srv.wait(timeout=5) == 0
        return json.loads(out.stdout)
    finally:
        srv.kill()


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_hosts_reach_each_other_over_tcp() -> None:
    require_netns()
    with isolated_hosts(["alice", "bob"]) as hosts:
        alice, bob = hosts["alice"], hosts["bob"]
        assert alice.address != bob.address and alice.namespace != bob.namespace
        report = _send(alice, bob, 5000, mode="echo")
        assert report["reply"] == ("mpc-ft!" * 715)[:5000]
        assert _send(bob, alice, 123)["reply"] == "123"


def test_shaped_link_is_limited_both_ways() -> None:
    require_netns()
    nbytes = 1_500_000  # 12 Mbit: 1.5 s at 8 Mbit/s
    with isolated_hosts(["slow", "fast1", "fast2"], shaped="slow", rate="8mbit") as hosts:
        slow, fast1, fast2 = hosts["slow"], hosts["fast1"], hosts["fast2"]
        unshaped = _send(fast1, fast2, nbytes)["seconds"]
        upload = _send(slow, fast1, nbytes)["seconds"]
        download = _send(fast2, slow, nbytes)["seconds"]
    assert unshaped < 0.5, f"unshaped transfer took {unshaped:.2f} s"
    for what, seconds in [("from", upload), ("to", download)]:
        assert 1.0 <= seconds < 4.0, f"1.5 MB {what} the 8mbit host took {seconds:.2f} s"


def test_namespaces_are_removed_on_exit_and_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    require_netns()

    def mine() -> set[str]:
        return {n for n in _namespaces() if n.startswith(tag + "-")}

    tag, subnet = netns._new_tag()
    monkeypatch.setattr(netns, "_new_tag", lambda: (tag, subnet))
    with isolated_hosts(["alice", "bob"]) as hosts:
        assert mine() == {hosts["alice"].namespace, hosts["bob"].namespace, f"{tag}-br"}
    assert mine() == set()

    with pytest.raises(KeyError), isolated_hosts(["alice", "bob"]):
        assert len(mine()) == 3
        raise KeyError("boom")
    assert mine() == set()

    with pytest.raises(RuntimeError, match="tc .*tbf"):  # setup fails half-way
        with isolated_hosts(["alice", "bob"], shaped="bob", rate="not-a-rate"):
            pass
    assert mine() == set()


def test_hosts_are_unreachable_from_outside_the_bridge() -> None:
    require_netns()
    with isolated_hosts(["alice", "bob"]) as hosts:
        alice, bob = hosts["alice"], hosts["bob"]
        # An outsider with an address in the same /24, on a veth pair of its own.
        outsider = Host(
            "outsider", f"{alice.namespace}-out", alice.address.rsplit(".", 1)[0] + ".200", "o0"
        )
        subprocess.run(["ip", "netns", "add", outsider.namespace], check=True)
        try:
            for argv in [
                ["ip", "link", "add", "o0", "type", "veth", "peer", "name", "o1"],
                ["ip", "addr", "add", f"{outsider.address}/24", "dev", "o0"],
                ["ip", "link", "set", "o0", "up"],
                ["ip", "link", "set", "o1", "up"],
            ]:
                subprocess.run(outsider.command(argv), check=True)
            server = _serve(alice, "count")
            try:
                probe = [sys.executable, "-c", CLIENT, alice.address, str(PORT), "10", "1"]
                out = subprocess.run(outsider.command(probe), capture_output=True, timeout=30)
                assert out.returncode != 0, "the outsider reached alice"
                # Not a local "network unreachable": the SYN went out and nothing answered.
                assert b"TimeoutError" in out.stderr, out.stderr
                assert server.poll() is None  # alice's server never saw a connection
            finally:
                server.kill()
            assert _send(bob, alice, 10)["reply"] == "10"  # while a member gets through
        finally:
            subprocess.run(["ip", "netns", "delete", outsider.namespace], check=True)


def test_several_hosts_can_be_shaped_with_a_chosen_burst() -> None:
    require_netns()

    def qdisc(namespace: str, device: str) -> str:
        argv = ["tc", "-n", namespace, "qdisc", "show", "dev", device]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    names = ["a", "b", "c"]
    with isolated_hosts(names, shaped=["a", "c"], rate="100mbit", burst="8kb") as hosts:
        bridge = hosts["a"].namespace.rsplit("-", 1)[0] + "-br"
        for i, name in enumerate(names):
            links = [qdisc(hosts[name].namespace, hosts[name].interface), qdisc(bridge, f"veth{i}")]
            for link in links:  # both directions of a shaped host's link, neither of b's
                assert ("tbf" in link and "rate 100Mbit" in link and "burst 8Kb" in link) == (
                    name != "b"
                ), link
    with pytest.raises(ValueError, match="'d' is not one of"):
        with isolated_hosts(names, shaped=["a", "d"]):
            pass
