"""Where a party listens and connects: the rendezvous address, the interface gloo binds, and the
warning for plaintext links between hosts.

gloo's TCP transport, like the parties' direct links (links.py, which listen on the same
address), is neither encrypted nor authenticated. Between hosts, the links must run
inside a tunnel (WireGuard, SSH) that the job declares with `mpc.secure_tunnel = true`; a party
that binds a non-loopback address without that declaration prints a loud warning.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

from mpc_ft.errors import BadInput

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class Rendezvous:
    """The store every party of a job connects to first; the first computing party hosts it."""

    host: str
    port: int
    url: str
    hosted_by_launcher: bool = False  # torchrun's agent already serves a store at this address


def parse_rendezvous(url: str, environ: dict[str, str] | None = None) -> Rendezvous:
    """tcp://host:port, or env:// with MASTER_ADDR and MASTER_PORT (torchrun); BadInput else."""
    environ = os.environ if environ is None else environ
    if url == "env://":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise BadInput(f"mpc.rendezvous env:// needs {' and '.join(missing)} in the "
                           "environment (torchrun sets them; or use tcp://host:port)")  # fmt: skip
        host, port_text = environ["MASTER_ADDR"], environ["MASTER_PORT"]
        agent = environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    else:
        parts = urlsplit(url)
        if parts.scheme != "tcp" or not parts.hostname or parts.path not in ("", "/"):
            raise BadInput(f"mpc.rendezvous {url!r}: expected tcp://host:port or env://")
        host, port_text, agent = parts.hostname, str(parts.port or ""), False
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadInput(f"mpc.rendezvous {url!r}: no valid port ({port_text or 'none'})")
    return Rendezvous(host=host, port=int(port_text), url=url, hosted_by_launcher=agent)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def interface_addresses() -> dict[str, str]:
    """{interface name: IPv4 address} for this host's (this namespace's) interfaces."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
            found[name] = socket.inet_ntoa(raw[20:24])
    return found


def choose_interface(host: str, interface: str | None) -> tuple[str | None, str]:
    """The interface gloo should bind (None: gloo's default) and the address that implies.

    An explicit interface must exist. Otherwise the interface holding the party's declared host
    address is used, so that peers on other hosts reach the address the job file names."""
    addresses = interface_addresses()
    if interface:
        if interface not in addresses:
            known = ", ".join(f"{n} ({a})" for n, a in sorted(addresses.items())) or "none"
            raise BadInput(f"--interface {interface}: no such interface with an IPv4 address "
                           f"here (have: {known})")  # fmt: skip
        return interface, addresses[interface]
    for name, address in addresses.items():
        if address == host and not is_loopback(host):
            return name, address
    return None, host


def plaintext_link_warning(party: str, address: str, secure_tunnel: bool) -> str | None:
    """The loud warning for a non-loopback bind without a declared tunnel (None when fine)."""
    if secure_tunnel or is_loopback(address):
        return None
    return (
        f"WARNING: party {party!r} binds {address}, which is not loopback, and the job does not "
        "declare mpc.secure_tunnel = true. gloo's TCP and the parties' direct links are "
        "neither encrypted nor authenticated: "
        "anyone on the path can read and alter this party's traffic (shares, and the trained "
        "head revealed to its owner). Run the links inside WireGuard or SSH tunnels (README: "
        "'Deploying across hosts') and set mpc.secure_tunnel = true."
    )
