"""Direct links between the computing parties (TCP; Unix sockets on one host), for the online
phase's messages (messages.py).

Why: gloo hands each arriving message from its own I/O thread to the waiting thread, two thread
wake-ups per message. On this project's 2-core machines a 32-element exchange between two parties
that compute ~1 ms between exchanges took a median 0.3-0.9 ms over gloo and, in 10-22% of the
exchanges, 2-5 ms (a scheduler tick); over a plain socket that the waiting thread reads itself,
0.03 ms (benchmarks/test_links.py). A training step makes 42-346 such exchanges.

Steps:
1. `connect`: every computing party listens on its own address (the OS picks the port; on a
   loopback address, where every peer is on this host, a Unix socket instead) and
   shares address, port and a fresh random nonce with the others over gloo (one all_gather at
   start-up, in CrypTen's group of computing parties; the dealer is not linked). Party j then
   connects to each party i < j and says who it is and i's nonce; i accepts its higher peers and
   drops any connection that does not say so. The nonce keeps strays (another job's process on
   the same host) out; it is not authentication.
2. `Links.exchange(outgoing, incoming)`: for every peer, send a 16-byte header (sequence number,
   byte count) and the payload, and receive that peer's header and payload into a buffer of the
   size this party expects, interleaved on non-blocking sockets: two parties sending megabytes to
   each other at once would otherwise both block on full socket buffers. When no socket can
   move, it sleeps in select() (spinning 50-200 us first measured no faster). A header that is
   not the expected one (another byte count or sequence number: the parties are out of step), a
   closed link, or `timeout_s` without progress raise LinkError naming the peer, never a silent
   wrong value.

Security: the same as gloo's TCP links (network.py): neither encrypted nor authenticated. Between
hosts they must run inside the job's tunnel, like gloo's.
"""

from __future__ import annotations

import ipaddress
import secrets
import select
import socket
import struct
import time
from typing import Any

from mpc_ft import network

HEADER = struct.Struct("<qq")  # sequence number, payload bytes
HELLO = struct.Struct("<qq")  # the connecting party's rank, the listener's nonce
BUFFER_BYTES = 4 << 20  # socket buffers: a step's largest opening (1.5 MiB) in one go


class LinkError(RuntimeError):
    """A peer's link failed: closed, timed out or out of step (a RuntimeError, as gloo's are:
    party.py diagnoses both alike)."""


class Links:
    """This party's connected sockets to every other computing party."""

    def __init__(self, rank: int, sockets: dict[int, socket.socket], timeout_s: float) -> None:
        self.rank = rank
        self.sockets = sockets
        self.timeout_s = timeout_s
        self.sent = dict.fromkeys(sockets, 0)  # messages sent to / received from each peer
        self.received = dict.fromkeys(sockets, 0)
        for s in sockets.values():
            s.setblocking(False)

    def exchange(self, outgoing: dict[int, Any], incoming: dict[int, Any]) -> None:
        """Send each `outgoing[peer]` (a bytes-like payload) to its peer and fill each
        `incoming[peer]` (a writable bytes-like of the expected size) from its peer (step 2)."""
        sends = {}
        for peer, payload in outgoing.items():
            view = memoryview(payload).cast("B")
            sends[peer] = [memoryview(HEADER.pack(self.sent[peer], view.nbytes)), view]
            self.sent[peer] += 1
        recvs = {peer: _Inbound(memoryview(buf).cast("B")) for peer, buf in incoming.items()}
        while sends or recvs:
            moved = False
            for peer in list(sends):
                moved |= self._send_some(peer, sends)
            for peer in list(recvs):
                moved |= self._receive_some(peer, recvs)
            if not moved:
                self._wait(sends, recvs)

    def close(self) -> None:
        for s in self.sockets.values():
            s.close()

    def _send_some(self, peer: int, sends: dict[int, list[memoryview]]) -> bool:
        views = sends[peer]
        try:
            n = self.sockets[peer].sendmsg(views)
        except BlockingIOError:
            return False
        except OSError as error:
            raise self._failed(peer, error) from error
        while views and n >= views[0].nbytes:  # empty payloads go with their header
            n -= views.pop(0).nbytes
        if n:
            views[0] = views[0][n:]
        if not views:
            del sends[peer]
        return True

    def _receive_some(self, peer: int, recvs: dict[int, _Inbound]) -> bool:
        inbound = recvs[peer]
        try:
            n = self.sockets[peer].recv_into(inbound.pending())
        except BlockingIOError:
            return False
        except OSError as error:
            raise self._failed(peer, error) from error
        if n == 0:
            raise LinkError(f"party {self.rank}: party {peer} closed its link")
        if inbound.advance(n):  # the header is complete: check it before the payload
            sequence, nbytes = HEADER.unpack(inbound.header)
            expected = (self.received[peer], inbound.payload.nbytes)
            if (sequence, nbytes) != expected:
                raise LinkError(
                    f"party {self.rank}: party {peer} is out of step: its message "
                    f"{sequence} has {nbytes} bytes, expected message {expected[0]} of "
                    f"{expected[1]} bytes"
                )
        if inbound.done():
            self.received[peer] += 1
            del recvs[peer]
        return True

    def _failed(self, peer: int, error: OSError) -> LinkError:
        return LinkError(f"party {self.rank}: the link to party {peer} failed ({error})")

    def _wait(self, sends: dict[int, Any], recvs: dict[int, Any]) -> None:
        readable = [self.sockets[p] for p in recvs]
        writable = [self.sockets[p] for p in sends]
        r, w, _ = select.select(readable, writable, [], self.timeout_s)
        if not r and not w:
            waiting = sorted(set(sends) | set(recvs))
            raise LinkError(f"party {self.rank}: no progress with parties {waiting} in "
                            f"{self.timeout_s:g} s (mpc.timeout_s)")  # fmt: skip


class _Inbound:
    """One expected message: 16 header bytes, then the payload, received into place."""

    def __init__(self, payload: memoryview) -> None:
        self.header = bytearray(HEADER.size)
        self.payload = payload
        self.got = 0

    def pending(self) -> memoryview:
        if self.got < HEADER.size:
            return memoryview(self.header)[self.got :]
        return self.payload[self.got - HEADER.size :]

    def advance(self, n: int) -> bool:
        """Count n more bytes; True when this completes the header."""
        before, self.got = self.got, self.got + n
        return before < HEADER.size <= self.got

    def done(self) -> bool:
        return self.got >= HEADER.size + self.payload.nbytes


def listen(host: str, nonce: int, local: bool | None = None) -> tuple[socket.socket, int]:
    """A listening socket and the port to publish. On `host` (an IPv4 address), port chosen by
    the OS; or, `local` (default: a loopback address, so every peer is on this host), a Unix
    socket named by the nonce, published as port 0: on loopback TCP a byte costs ~0.2 ms of CPU
    per MiB each way, over a Unix socket ~0.13 (measured here)."""
    local = network.is_loopback(host) if local is None else local
    if local:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(_unix_name(nonce))
        port = 0
    else:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind((host, 0))
        port = server.getsockname()[1]
    server.listen(64)
    return server, port


def dial(host: str, port: int, nonce: int, timeout_s: float) -> socket.socket:
    """Connect to a peer's listening socket as `listen` published it (port 0: its Unix socket)."""
    if port == 0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout_s)
        s.connect(_unix_name(nonce))
        return s
    return socket.create_connection((host, port), timeout=timeout_s)


def _unix_name(nonce: int) -> str:
    return f"\0mpc-ft-link-{nonce:016x}"  # Linux's abstract namespace: no file to clean up


def _tuned(s: socket.socket) -> socket.socket:
    if s.family != socket.AF_UNIX:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
    return s


def join(rank: int, server: socket.socket, nonce: int, directory: dict[int, tuple[str, int, int]],
         timeout_s: float) -> dict[int, socket.socket]:  # fmt: skip
    """Step 1 after the directory (rank -> address, port, nonce) is known: connect to every
    lower rank, accept every higher one; returns rank -> connected socket."""
    deadline = time.monotonic() + timeout_s
    sockets = {}
    for peer in sorted(p for p in directory if p < rank):
        host, port, peer_nonce = directory[peer]
        s = dial(host, port, peer_nonce, timeout_s)
        s.sendall(HELLO.pack(rank, peer_nonce))
        sockets[peer] = _tuned(s)
    higher = {p for p in directory if p > rank}
    while higher - set(sockets):
        server.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            s, _ = server.accept()
        except TimeoutError as error:
            missing = sorted(higher - set(sockets))
            raise LinkError(f"party {rank}: parties {missing} did not connect in "
                            f"{timeout_s:g} s") from error  # fmt: skip
        s.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            hello = _read_exactly(s, HELLO.size)
        except OSError:
            s.close()
            continue
        peer, said = HELLO.unpack(hello) if hello is not None else (-1, -1)
        if said != nonce or peer not in higher or peer in sockets:
            s.close()  # a stray connection: not this job's peer
            continue
        sockets[peer] = _tuned(s)
    server.close()
    return sockets


def _read_exactly(s: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def connect(communicator: Any, address: str, timeout_s: float) -> Links:
    """Step 1 for this process's CrypTen communicator: listen, share the directory over gloo
    (one all_gather among the computing parties), then connect and accept."""
    import torch
    import torch.distributed as dist

    rank, world = communicator.get_rank(), communicator.get_world_size()
    nonce = secrets.randbits(62)
    host = socket.gethostbyname(address)  # the job file may name the host
    server, port = listen(host, nonce)
    mine = torch.tensor([int(ipaddress.IPv4Address(host)), port, nonce], dtype=torch.long)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=communicator.main_group)
    directory = {
        p: (str(ipaddress.IPv4Address(int(t[0]))), int(t[1]), int(t[2]))
        for p, t in enumerate(everyone)
        if p != rank
    }
    return Links(rank, join(rank, server, nonce, directory, timeout_s), timeout_s)
