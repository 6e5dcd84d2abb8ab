"""links.py: the direct TCP links between computing parties (compat patch 19).

The protocol is pinned in-process, on connected socket pairs driven by threads; the links of a
real CrypTen job (connected at init, used by openings, gathers, send and recv) in test_compat."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from mpc_ft import links


def _pairs(parties: int) -> list[dict[int, socket.socket]]:
    """A full mesh of connected sockets: sockets[rank][peer]."""
    mesh: list[dict[int, socket.socket]] = [{} for _ in range(parties)]
    for i in range(parties):
        for j in range(i + 1, parties):
            mesh[i][j], mesh[j][i] = socket.socketpair()
    return mesh


def _run_all(work: list, timeout_s: float = 30.0) -> list:
    """Run each callable in a thread; their results, or re-raise the first error."""
    results: list = [None] * len(work)
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = work[i]()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "an exchange hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("parties", [2, 3, 4])
def test_every_party_receives_every_peers_payload_even_megabytes_at_once(parties):
    """Every party sends 8 MiB to every other at the same moment (more than the socket buffers
    hold: blocking sends would deadlock), then small messages: all arrive intact, in order."""
    mesh = _pairs(parties)
    sizes = [1 << 20, 3, 0, 17]  # int64 elements: 8 MiB, then small and empty messages

    def party(rank: int):
        own = links.Links(rank, mesh[rank], timeout_s=20)
        got = []
        for k, n in enumerate(sizes):
            payload = np.arange(n, dtype=np.int64) * (rank + 1) + k
            inbox = {p: np.empty(n, dtype=np.int64) for p in mesh[rank]}
            own.exchange(dict.fromkeys(mesh[rank], payload), inbox)
            got.append(inbox)
        return got

    results = _run_all([lambda r=r: party(r) for r in range(parties)])
    for rank, got in enumerate(results):
        for k, n in enumerate(sizes):
            for peer, array in got[k].items():
                assert peer != rank
                assert np.array_equal(array, np.arange(n, dtype=np.int64) * (peer + 1) + k)


def test_one_way_messages_and_sequence_numbers():
    """A send with nothing to receive, and a receive with nothing to send (CrypTen's send and
    recv), keep both ends' counts in step."""
    mesh = _pairs(2)
    a, b = links.Links(0, mesh[0], 5), links.Links(1, mesh[1], 5)
    box = np.empty(4, dtype=np.int64)
    _run_all([lambda: a.exchange({1: np.arange(4, dtype=np.int64)}, {}),
              lambda: b.exchange({}, {0: box})])  # fmt: skip
    assert box.tolist() == [0, 1, 2, 3]
    assert (a.sent, b.received) == ({1: 1}, {0: 1})


def test_a_message_of_another_size_is_an_error_not_a_wrong_value():
    mesh = _pairs(2)
    a, b = links.Links(0, mesh[0], 5), links.Links(1, mesh[1], 5)
    with pytest.raises(links.LinkError, match="out of step.*has 24 bytes.*of 16 bytes"):
        _run_all([lambda: a.exchange({1: np.zeros(3, dtype=np.int64)}, {}),
                  lambda: b.exchange({}, {0: np.empty(2, dtype=np.int64)})])  # fmt: skip


def test_a_closed_peer_and_a_silent_peer_fail_clearly():
    mesh = _pairs(2)
    mesh[1][0].close()
    with pytest.raises(links.LinkError, match="party 1 closed its link"):
        links.Links(0, mesh[0], 5).exchange({}, {1: np.empty(2, dtype=np.int64)})
    mesh = _pairs(2)
    start = time.monotonic()
    with pytest.raises(links.LinkError, match=r"no progress with parties \[1\] in 0.3 s"):
        links.Links(0, mesh[0], 0.3).exchange({}, {1: np.empty(2, dtype=np.int64)})
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("local", [True, False], ids=["unix", "tcp"])
def test_join_connects_every_pair_and_turns_strays_away(local):
    """Step 1 without gloo: each party listens, then joins from a directory; a stray connection
    (a wrong nonce, or a rank that is not higher) is closed and the join still completes. On
    loopback the links are Unix sockets (local), else TCP."""
    parties, nonces = 3, [11, 22, 33]
    servers, directory = [], {}
    for rank in range(parties):
        server, port = links.listen("127.0.0.1", nonces[rank], local=local)
        assert (port == 0) == local
        servers.append(server)
        directory[rank] = ("127.0.0.1", port, nonces[rank])
    strays = []
    for hello in ((2, 999), (0, nonces[0])):  # wrong nonce; a rank not above party 0
        stray = links.dial(*directory[0], timeout_s=5)
        stray.sendall(links.HELLO.pack(*hello))
        strays.append(stray)

    def party(rank: int):
        others = {p: v for p, v in directory.items() if p != rank}
        return links.join(rank, servers[rank], nonces[rank], others, timeout_s=10)

    meshes = _run_all([lambda r=r: party(r) for r in range(parties)])
    assert [sorted(m) for m in meshes] == [[1, 2], [0, 2], [0, 1]]
    family = socket.AF_UNIX if local else socket.AF_INET
    assert all(s.family == family for m in meshes for s in m.values())
    for stray in strays:  # party 0 closed them: reading gives end of stream
        stray.settimeout(5)
        assert stray.recv(1) == b""
    # the mesh works: every party hears every other
    results = _run_all([
        lambda r=r: _ping(links.Links(r, meshes[r], 5), r) for r in range(parties)
    ])  # fmt: skip
    assert results == [{1: 1, 2: 2}, {0: 0, 2: 2}, {0: 0, 1: 1}]


def _ping(own: links.Links, rank: int) -> dict[int, int]:
    inbox = {p: np.empty(1, dtype=np.int64) for p in own.sockets}
    own.exchange(dict.fromkeys(own.sockets, np.array([rank])), inbox)
    return {p: int(a[0]) for p, a in inbox.items()}


def test_join_gives_up_when_a_peer_never_connects():
    server, _ = links.listen("127.0.0.1", 1)
    with pytest.raises(links.LinkError, match=r"parties \[1\] did not connect in 0.5 s"):
        links.join(0, server, 1, {1: ("127.0.0.1", 1, 2)}, timeout_s=0.5)
