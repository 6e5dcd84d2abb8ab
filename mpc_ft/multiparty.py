"""Run a function once per party, each in its own spawned process: the helper for tests and
benchmarks that need a real multi-party CrypTen session on one machine.

    results = run_multiparty(fn, parties=2, args=(x,))   # fn(rank, *args) on every party

Every computing party joins a fresh loopback rendezvous with explicit rank and world size; with the
TTP provider a dealer process serves triples. A party's exception comes back with its traceback;
if any party fails or the deadline passes, all processes are killed and `MultipartyError` names
each failed rank. Results must be picklable (they cross a process boundary back to the parent,
never between parties).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from mpc_ft import compat
from mpc_ft.config import auto_precision_bits


class MultipartyError(RuntimeError):
    """One or more parties failed or timed out; the message holds each failed rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _party_main(
    ep: compat.PartyEndpoint, fn: Callable[..., Any], args: tuple, out: mp.Queue
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        if ep.rank == ep.world_size:
            compat.run_dealer(ep)
            out.put((ep.rank, "ok", None))
            return
        compat.init_party(ep)
        try:
            result = fn(ep.rank, *args)
        finally:
            compat.shutdown()
        # plain pickle: torch's queue pickler would pass tensors as shared memory that dies with us
        out.put((ep.rank, "ok", pickle.dumps(result)))
    except BaseException:
        out.put((ep.rank, "error", traceback.format_exc()))


def run_multiparty(
    fn: Callable[..., Any],
    *,
    parties: int = 2,
    provider: str = "TTP",
    precision_bits: int = 0,
    timeout_s: float = 300.0,
    args: tuple = (),
) -> list[Any]:
    """fn(rank, *args) on `parties` computing parties (+ the dealer); returns results by rank."""
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    ranks = list(range(parties + (1 if provider == "TTP" else 0)))
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = {}
    for rank in ranks:
        ep = compat.PartyEndpoint(
            rank=rank,
            world_size=parties,
            rendezvous=rendezvous,
            provider=provider,
            precision_bits=precision_bits or auto_precision_bits(parties),
            timeout_s=min(timeout_s, 120.0),
        )
        procs[rank] = ctx.Process(target=_party_main, args=(ep, fn, args, out), daemon=True)
        procs[rank].start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < len(ranks):
            try:
                rank, status, value = out.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in procs.items() if not p.is_alive() and p.exitcode != 0]
                dead = [r for r in dead if r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode}"
                if time.monotonic() > deadline:
                    for r in ranks:
                        if r not in results and r not in errors:
                            errors[r] = f"timed out after {timeout_s:.0f} s"
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
