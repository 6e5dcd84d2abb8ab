"""Multi-party runs on one machine, for tests and benchmarks.

    results = run_multiparty(fn, parties=2, args=(x,))   # fn(rank, *args) on every party
    with PartyProcesses(job_file, {"alice": [...], ...}, env=env) as run: ...   # `mpc-ft party`

run_multiparty: a function once per party, each in its own process (a real CrypTen session),
forked from a server process that imported torch and CrypTen once (mpc_ft/preload.py; spawning
each afresh cost 4-6 s a session). The server starts with the first session and keeps the
environment and sys.path of that moment: set variables that parties read before it.
PartyProcesses: whole `mpc-ft party` processes, started the way separate hosts start them (tests
of deployment, failures and the handshake).

Every computing party joins a fresh loopback rendezvous with explicit rank and world size; with the
TTP provider a dealer process serves triples. With `hosts`, each process first moves into its own
network namespace (tests/netns.py makes them) and talks over that namespace's interface instead;
with `latency_s`, each computing party runs `fn` under `compat.emulate_latency` (benchmarks).
A party's exception comes back with its traceback; if any party fails, dies or the deadline
passes, all processes are killed at once and `MultipartyError` names each failed rank
(tests/test_multiparty.py). Results must be picklable (they cross a process boundary back to
the parent, never between parties).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpc_ft import compat
from mpc_ft.config import MpcConfig


class MultipartyError(RuntimeError):
    """One or more parties failed or timed out; the message holds each failed rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLONE_NEWNET = 0x40000000  # from <sched.h>


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (as made by `ip netns add`).

    Python 3.11 has no os.setns. Only the calling thread moves; threads it starts afterwards
    (gloo's) inherit the namespace, so call this first thing in a fresh process."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into network namespace {name!r}: {os.strerror(errno)}")


def _party_main(
    ep: compat.PartyEndpoint,
    fn: Callable[..., Any],
    args: tuple,
    out: mp.Queue,
    netns: str | None = None,
    latency_s: float = 0.0,
    dealer_ahead: bool = True,
) -> None:
    try:
        if netns is not None:
            enter_netns(netns)  # first: gloo's sockets and threads must all live there
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        if ep.rank == ep.world_size:
            compat.run_dealer(ep, ahead=dealer_ahead)
            out.put((ep.rank, "ok", None))
            return
        compat.init_party(ep)
        try:
            if latency_s:
                with compat.emulate_latency(latency_s):
                    result = fn(ep.rank, *args)
            else:
                result = fn(ep.rank, *args)
        finally:
            compat.shutdown()
        # plain pickle: torch's queue pickler would pass tensors as shared memory that dies with us
        out.put((ep.rank, "ok", pickle.dumps(result)))
    except BaseException:
        out.put((ep.rank, "error", traceback.format_exc()))


def _fork_server() -> mp.context.BaseContext:
    """Party processes forked from a fork server that has imported torch and CrypTen once
    (mpc_ft/preload.py), not spawned afresh: a session starts in under 1 s, not 4-6 s."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mpc_ft.preload"])
    return ctx


def run_multiparty(
    fn: Callable[..., Any],
    *,
    parties: int = 2,
    provider: str = "TTP",
    precision_bits: int = MpcConfig.precision_bits,
    timeout_s: float = 300.0,
    args: tuple = (),
    hosts: dict[int, tuple[str, str, str]] | None = None,
    latency_s: float = 0.0,
    dealer_ahead: bool = True,
) -> list[Any]:
    """fn(rank, *args) on `parties` computing parties (+ the dealer); returns results by rank.

    hosts: rank -> (network namespace, its address, its interface) for every process, the
    dealer's rank (== parties) included; gloo binds to that interface and the rendezvous is on
    rank 0's address. latency_s: each computing party (not the dealer) sleeps this long per
    CrypTen round while `fn` runs (compat.emulate_latency, a benchmark emulation).
    dealer_ahead=False: the dealer computes a step's triples only when asked (offline.py)."""
    ranks = list(range(parties + (1 if provider == "TTP" else 0)))
    if hosts is not None and set(hosts) != set(ranks):
        raise ValueError(f"hosts must name exactly ranks {ranks}, got {sorted(hosts)}")
    address = "127.0.0.1" if hosts is None else hosts[0][1]
    rendezvous = f"tcp://{address}:{free_port()}"
    ctx = _fork_server()
    out: mp.Queue = ctx.Queue()
    procs = {}
    for rank in ranks:
        ep = compat.PartyEndpoint(
            rank=rank,
            world_size=parties,
            rendezvous=rendezvous,
            provider=provider,
            precision_bits=precision_bits,
            timeout_s=min(timeout_s, 120.0),
            socket_ifname=None if hosts is None else hosts[rank][2],
            address="127.0.0.1" if hosts is None else hosts[rank][1],
        )
        netns = None if hosts is None else hosts[rank][0]
        procs[rank] = ctx.Process(
            target=_party_main,
            args=(ep, fn, args, out, netns, latency_s, dealer_ahead),
            daemon=True,
        )
        procs[rank].start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < len(ranks):
            try:
                rank, status, value = out.get(timeout=1.0)
            except queue.Empty:
                waiting = [r for r in ranks if r not in results]
                for r in waiting:
                    if not procs[r].is_alive() and procs[r].exitcode != 0:
                        errors[r] = f"process exited with code {procs[r].exitcode}"
                if not errors and time.monotonic() > deadline:
                    errors.update({r: f"timed out after {timeout_s:.0f} s" for r in waiting})
                if errors:
                    break  # the others would wait for a dead party until the deadline
                continue
            if status == "ok":
                results[rank] = pickle.loads(value) if value is not None else None
            else:
                errors[rank] = value
            if errors:
                break
    finally:
        for p in procs.values():
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise MultipartyError(f"{len(errors)} part(y/ies) failed: ranks {sorted(errors)}\n{detail}")
    return [results[r] for r in range(parties)]


@dataclass
class PartyExit:
    """How one `mpc-ft party` process ended."""

    name: str
    code: int | None  # None: still running at the deadline (then killed)
    output: str
    seconds: float  # from the start of the run


class PartyProcesses:
    """`mpc-ft party` processes, one per party, exactly as separate hosts would start them.

        with PartyProcesses(job_file, {"alice": [...args], "dealer": []}, env=env) as run:
            run.wait_for_line("bob", "training")   # optional: act mid-job
            run.kill("bob")
            exits = run.wait(timeout_s=120)        # {name: PartyExit}

    A key "bob#2" starts a second process for party bob. `prefix` puts a command in front of a
    party's (e.g. `ip netns exec NS`); `command="infer"` runs `mpc-ft infer`. Each process's
    stdout and stderr are collected line by line; whatever is still running on leaving the
    block is killed."""

    def __init__(self, job_file: Path, args: dict[str, list[str]], *, env: dict[str, str],
                 prefix: dict[str, list[str]] | None = None,
                 command: str = "party") -> None:  # fmt: skip
        self.commands = {
            name: [*(prefix or {}).get(name, []), sys.executable, "-m", "mpc_ft.cli", command,
                   "--job", str(job_file), "--party", name.split("#")[0], *extra]
            for name, extra in args.items()
        }  # fmt: skip
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
        self.lines: dict[str, list[str]] = {name: [] for name in args}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ended: dict[str, float] = {}
        self._pumps: list[threading.Thread] = []

    def __enter__(self) -> PartyProcesses:
        self.start = time.monotonic()
        for name, cmd in self.commands.items():
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=self.env, text=True)  # fmt: skip
            self.procs[name] = proc
            pump = threading.Thread(target=self._pump, args=(name, proc), daemon=True)
            pump.start()
            self._pumps.append(pump)
        return self

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines[name].append(line.rstrip("\n"))
        proc.wait()
        self.ended[name] = time.monotonic() - self.start

    def wait_for_line(self, name: str, text: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines[name]):
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise TimeoutError(f"{name} never printed {text!r}:\n" + self.output(name))
            time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)

    def output(self, name: str) -> str:
        return "\n".join(self.lines[name])

    def wait(self, timeout_s: float = 300.0, only: list[str] | None = None) -> dict[str, PartyExit]:
        """Wait for every process (or those in `only`) to end, up to `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        for name, proc in self.procs.items():
            if only is not None and name not in only:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pump in self._pumps:
            pump.join(timeout=2)
        return {
            name: PartyExit(name, proc.poll(), self.output(name),
                            self.ended.get(name, time.monotonic() - self.start))
            for name, proc in self.procs.items()
        }  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
