"""Simulated hosts for tests: one Linux network namespace per host, joined by a bridge.

Each host gets its own namespace, IPv4 address and interface, so a test can run one OS process
per host and have them talk over real TCP, optionally through a bandwidth-limited (`tc tbf`)
link. The root namespace's interfaces and routes are never touched. Needs root and iproute2;
call `netns_unavailable()` first and skip with its reason when it is not None. Example:

    with isolated_hosts(["alice", "bob"], shaped="bob", rate="8mbit") as hosts:
        alice, bob = hosts["alice"], hosts["bob"]
        server = subprocess.Popen(bob.command([sys.executable, "server.py", bob.address]))
        subprocess.run(alice.command([sys.executable, "client.py", bob.address]), check=True)
        server.wait()

All namespaces of one run are named "<tag>-<host>" plus "<tag>-br" (the bridge), where the tag
and the 10.x.y.0/24 subnet come from the pid and a random number, so parallel runs don't collide.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

BRIDGE = "br0"
INTERFACE = "eth0"


@dataclass(frozen=True)
class Host:
    name: str  # e.g. "alice"
    namespace: str  # the netns name
    address: str  # IPv4 address, e.g. "10.231.7.2"
    interface: str  # the interface inside the namespace that holds `address`, e.g. "eth0"

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace (for subprocess.run / Popen)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _run(command: str) -> None:
    """Runs `command` (split on spaces); RuntimeError with it and its stderr when it fails."""
    proc = subprocess.run(command.split(), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{command}` failed: {proc.stderr.strip()}")


def _new_tag() -> tuple[str, str]:
    """A namespace-name prefix and a /24 prefix ("10.x.y"), unique per process and call."""
    pid, rnd = os.getpid() % 0x10000, random.getrandbits(16)
    return f"mf{pid:04x}{rnd:04x}", f"10.{(pid ^ rnd) % 256}.{rnd >> 8}"


def _shape(namespace: str, device: str, rate: str, burst: str = "32kb") -> None:
    # tbf: burst must hold at least one MTU-sized packet (and ~1 ms of `rate` to reach it: 32kb
    # gives ~50-75% of 1gbit, 128kb ~95%); latency bounds the queue length.
    tbf = f"tbf rate {rate} burst {burst} latency 50ms"
    _run(f"tc -n {namespace} qdisc add dev {device} root {tbf}")


@functools.cache
def netns_unavailable() -> str | None:
    """None when `isolated_hosts` can work here, else a one-line reason why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        with isolated_hosts(["probe"], shaped="probe"):
            return None
    except RuntimeError as exc:
        return f"network namespaces unusable: {exc}".splitlines()[0]


def require_netns() -> None:
    """Skips the calling test where namespaces are unusable; fails it under MPC_FT_REQUIRE_NETNS=1
    (CI sets it: there the namespace tests must run)."""
    import pytest

    reason = netns_unavailable()
    if reason is not None:
        if os.environ.get("MPC_FT_REQUIRE_NETNS") == "1":
            pytest.fail(f"MPC_FT_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def isolated_hosts(
    names: list[str],
    *,
    shaped: str | list[str] | None = None,
    rate: str = "20mbit",
    burst: str = "32kb",
) -> Iterator[dict[str, Host]]:
    """Hosts `names` in fresh namespaces on one bridge; the link of `shaped` (one host or a list)
    is limited to `rate` in each direction (tbf with bucket `burst`)."""
    if len(set(names)) != len(names) or not all(re.fullmatch(r"\w+", n, re.ASCII) for n in names):
        raise ValueError(f"host names must be unique words: {names}")
    shaped = [shaped] if isinstance(shaped, str) else list(shaped or [])
    for name in shaped:
        if name not in names:
            raise ValueError(f"shaped host {name!r} is not one of {names}")
    if len(names) > 250:
        raise ValueError("at most 250 hosts fit in a /24")
    tag, subnet = _new_tag()
    bridge_ns = f"{tag}-br"
    created: list[str] = []
    try:
        for namespace in [bridge_ns, *(f"{tag}-{n}" for n in names)]:
            _run(f"ip netns add {namespace}")
            created.append(namespace)
            _run(f"ip -n {namespace} link set lo up")
        _run(f"ip -n {bridge_ns} link add {BRIDGE} type bridge")
        _run(f"ip -n {bridge_ns} link set {BRIDGE} up")
        hosts = {}
        for i, name in enumerate(names):
            host = Host(name, f"{tag}-{name}", f"{subnet}.{i + 2}", INTERFACE)
            ns, port = host.namespace, f"veth{i}"  # port: the bridge-side end, in bridge_ns
            _run(f"ip -n {ns} link add {INTERFACE} type veth peer name {port} netns {bridge_ns}")
            _run(f"ip -n {bridge_ns} link set {port} master {BRIDGE} up")
            _run(f"ip -n {ns} addr add {host.address}/24 dev {INTERFACE}")
            _run(f"ip -n {ns} link set {INTERFACE} up")
            if name in shaped:
                _shape(ns, INTERFACE, rate, burst)  # host -> bridge
                _shape(bridge_ns, port, rate, burst)  # bridge -> host
            hosts[name] = host
        yield hosts
    finally:
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
