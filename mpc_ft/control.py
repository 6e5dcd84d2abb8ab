"""The job's control plane: the rendezvous store, used for joining, liveness and failure reports.

The first computing party hosts a small key-value store (torch's TCPStore) at `mpc.rendezvous`
(under torchrun, the launcher's agent hosts it). Every process of the job connects to it first:

1. Claim: each process claims its party name once; a second process with the same name is
   refused (exit 2) before it can disturb the job.
2. Handshake (handshake.py): hellos and HMAC tags are posted and gathered here, before gloo
   connects the parties and before any data moves.
3. The gloo process group that CrypTen uses is built on the same store (compat.py).
4. Liveness: a thread in every process bumps its heartbeat counter every second and watches the
   others'. A party whose counter stalls for `mpc.peer_timeout_s`, or a report of a failure
   from any party, or the store itself going away (its host died), ends this process with exit
   code 3 and a one-line message naming the failed peer. A party that sees gloo fail first
   (connection reset) asks the store who stopped, reports it, and exits the same way.
5. Finish: each process posts `finished` (the first computing party before it tells the dealer
   to stop); the store's host waits for everyone's before leaving, so nobody mistakes a clean
   end for a failure.

A failing party leaves with os._exit(3) once its log is flushed: other threads may be blocked in
gloo for up to `mpc.timeout_s`, and gloo's destructors can abort (exit 134) after a reset.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any, NoReturn

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput, PeerFailure
from mpc_ft.network import Rendezvous

log = logging.getLogger("mpc_ft")

BEAT_S = 1.0  # heartbeat period
SETTLE_S = 3.0  # after a gloo error: a peer whose heartbeat stalls this long is the one that died
LINGER_S = 5.0  # the store's host waits this long for the others' reports before it leaves


class ControlPlane:
    """One process's connection to the job's store. Ranks are the job file's, by party name."""

    def __init__(self, job: JobConfig, name: str, rendezvous: Rendezvous) -> None:
        self.job = job
        self.name = name
        self.rank = job.rank(name)
        self.names = {job.rank(p.name): p.name for p in job.parties}
        self.rendezvous = rendezvous
        self.host_name = job.compute_parties[0].name  # who hosts the store
        self.store: Any = None  # the raw TCPStore (also given to gloo)
        self._board: Any = None  # our keys, under the "mpcft/" prefix
        self._stop = threading.Event()
        self._dying = threading.Lock()
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat count, when it moved)
        self._thread: threading.Thread | None = None

    # --- joining ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Host (first computing party) or reach the store within mpc.timeout_s, then claim."""
        import torch.distributed as dist

        rdv, timeout = self.rendezvous, timedelta(seconds=self.job.mpc.timeout_s)
        hosting = self.rank == 0 and not rdv.hosted_by_launcher
        try:
            self.store = dist.TCPStore(rdv.host, rdv.port, None, hosting, timeout,
                                       wait_for_workers=False)  # fmt: skip
        except RuntimeError as e:  # torch's DistError and its kin
            if hosting:
                raise BadInput(f"party {self.name!r} cannot host the rendezvous on port "
                               f"{rdv.port}: {_first_line(e)} (is this party already running, "
                               "or another job using the port?)") from None  # fmt: skip
            raise PeerFailure(f"could not reach the rendezvous {rdv.url} hosted by party "
                              f"{self.host_name!r} within {self.job.mpc.timeout_s:g} s "
                              f"({_first_line(e)})") from None  # fmt: skip
        self._board = dist.PrefixStore("mpcft/", self.store)
        if self._board.add(f"claim/{self.rank}", 1) > 1:
            raise BadInput(f"another process has already joined this job as party {self.name!r} "
                           "(two processes started with the same --party?)")  # fmt: skip
        log.info("joined the rendezvous %s as %s (rank %d)", rdv.url, self.name, self.rank)

    def put(self, key: str, value: bytes) -> None:
        try:
            self._board.set(key, value)
        except RuntimeError as e:  # torch's DistError and its kin
            raise self._lost_host(e) from None

    def gather(self, prefix: str, what: str) -> dict[int, bytes]:
        """Every process's value under `prefix/<rank>`, waiting up to mpc.timeout_s for them.

        The first process to time out posts why under "abort"; the others, still waiting,
        stop with the same message (and the store's host stays until they have read it)."""
        keys = {r: f"{prefix}/{r}" for r in self.names}
        deadline = time.monotonic() + self.job.mpc.timeout_s
        announced = time.monotonic()
        try:
            while True:
                missing = [r for r, k in keys.items() if not self._board.check([k])]
                if not missing:
                    return {r: self._board.get(k) for r, k in keys.items()}
                if self._board.check(["abort"]):
                    self._board.set(f"aborted/{self.rank}", b"1")
                    raise PeerFailure(self._board.get("abort").decode())
                who = ", ".join(repr(self.names[r]) for r in missing)
                if time.monotonic() > deadline:
                    message = (f"timed out after {self.job.mpc.timeout_s:g} s waiting for {who} "
                               f"to send its {what} at {self.rendezvous.url}")  # fmt: skip
                    self._board.set("abort", message)
                    self._board.set(f"aborted/{self.rank}", b"1")
                    if self.rank == 0 and not self.rendezvous.hosted_by_launcher:
                        self._linger(lambda r: self._board.check([f"aborted/{r}"]), joined=True)
                    raise PeerFailure(message)
                if time.monotonic() - announced > 30:
                    log.info("waiting for %s (%s)", who, what)
                    announced = time.monotonic()
                time.sleep(0.2)
        except RuntimeError as e:  # torch's DistError and its kin
            raise self._lost_host(e) from None

    def _lost_host(self, error: BaseException) -> PeerFailure:
        return PeerFailure(f"lost the rendezvous hosted by party {self.host_name!r}: it stopped "
                           f"or is unreachable ({_first_line(error)})")  # fmt: skip

    def wait_for_verdicts(self) -> None:
        """The store's host stays until every process has read the handshake (and said so)."""
        if self.rank == 0 and not self.rendezvous.hosted_by_launcher:
            self.gather("verdict", "handshake verdict")

    # --- liveness -----------------------------------------------------------------------------
    def start_watch(self) -> None:
        """Start the heartbeat and watch thread (after the handshake)."""
        self._thread = threading.Thread(target=self._watch, name="mpc-ft-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import torch.distributed as dist

        rdv = self.rendezvous
        try:  # a connection of its own: the main thread may hold the other one inside a wait
            client = dist.TCPStore(rdv.host, rdv.port, None, False,
                                   timedelta(seconds=self.job.mpc.peer_timeout_s))  # fmt: skip
            board = dist.PrefixStore("mpcft/", client)
            while not self._stop.is_set():
                self._beat(board)
                self._stop.wait(BEAT_S)
        except RuntimeError as e:  # torch's DistError and its kin
            if not self._stop.is_set():
                self.die(str(self._lost_host(e)), blame=[self.host_name])

    def _beat(self, board: Any) -> None:
        board.add(f"alive/{self.rank}", 1)
        if board.add("failures", 0) > 0:
            self._die_from_reports(board)
        now = time.monotonic()
        for r in self.names:
            if r == self.rank or board.check([f"finished/{r}"]):
                continue
            count = board.add(f"alive/{r}", 0)
            if count == 0:
                continue  # not watching yet: its handshake may still be finishing
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)
            elif now - last[1] > self.job.mpc.peer_timeout_s:
                self.die(f"party {self.names[r]!r} stopped answering (no heartbeat for "
                         f"{self.job.mpc.peer_timeout_s:g} s)", blame=[self.names[r]])  # fmt: skip

    def _die_from_reports(self, board: Any) -> None:
        for r in self.names:
            if r != self.rank and board.check([f"failed/{r}"]):
                blamed = board.get(f"failed/{r}").decode()
                culprit = blamed or self.names[r]
                self.die(f"party {culprit!r} failed (reported by {self.names[r]!r})",
                         blame=[culprit])  # fmt: skip

    def stalled_peers(self, window: float) -> list[str]:
        """Peers whose heartbeat has not moved for `window` seconds (by this process's clock)."""
        now = time.monotonic()
        return [self.names[r] for r, (_, moved) in self._seen.items() if now - moved > window]

    def diagnose(self, error: BaseException) -> NoReturn:
        """After gloo failed in this process: find the peer that stopped, report it, exit 3."""
        deadline = time.monotonic() + SETTLE_S + 2 * BEAT_S
        while time.monotonic() < deadline:
            gone = self.stalled_peers(SETTLE_S)
            if gone:
                self.die(f"party {', '.join(map(repr, gone))} stopped ({_first_line(error)})",
                         blame=gone)  # fmt: skip
            time.sleep(0.2)
        self.die(f"a peer failed or timed out ({_first_line(error)})", blame=[])

    def die(self, message: str, blame: list[str], code: int = 3) -> NoReturn:
        """Report the failure on the store (best effort), print one line, and exit `code`."""
        with self._dying:  # the first failure wins; a second thread waits here for the exit
            self._stop.set()
            log.error("peer failure: %s", message)
            try:
                self._board.set(f"failed/{self.rank}", ",".join(blame))
                self._board.add("failures", 1)
                if self.rank == 0 and not self.rendezvous.hosted_by_launcher:
                    self._linger(lambda r: self._board.check([f"failed/{r}"]))
            except Exception:  # noqa: BLE001 - the store may be the thing that died
                pass
            kind = "peer failure" if code == 3 else "stopped"
            print(f"mpc-ft: {kind}: {message}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(code)

    def _linger(self, done: Any, joined: bool = False) -> None:
        """The store's host: keep serving until every other live process has reported
        (`joined`: only those that have joined the rendezvous)."""
        deadline = time.monotonic() + LINGER_S
        others = [r for r in self.names if r != self.rank]
        if joined:
            others = [r for r in others if self._board.check([f"claim/{r}"])]
        while time.monotonic() < deadline:
            pending = [r for r in others if not (done(r) or self._board.check([f"finished/{r}"]))]
            if not pending or set(map(self.names.get, pending)) <= set(self.stalled_peers(2)):
                return
            time.sleep(0.2)

    # --- ending -------------------------------------------------------------------------------
    def finish(self) -> None:
        """A clean end for this process: stop watching, post `finished`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BEAT_S + 5)
        self._board.set(f"finished/{self.rank}", b"1")

    def close(self) -> None:
        """After `finish`: the store's host keeps it up until everyone has finished."""
        if self.rank != 0 or self.rendezvous.hosted_by_launcher:
            return
        deadline = time.monotonic() + self.job.mpc.timeout_s
        while not all(self.finished(name) for name in self.names.values()):
            if time.monotonic() > deadline:
                log.warning("not every party confirmed the end of the job")
                return
            time.sleep(0.1)

    def finished(self, name: str) -> bool:
        return bool(self._board.check([f"finished/{self.job.rank(name)}"]))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__
