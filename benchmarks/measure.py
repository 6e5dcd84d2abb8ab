"""Measuring a workload under MPC and in plaintext, side by side in one run.

A workload is two module-level functions (picklable, so spawned parties can run them):
`build(**config) -> dict[str, Tensor]` makes seeded plain inputs, identical on every party;
`run(inputs, ops, timer, **config)` computes with `ops` (TorchOps or MpcOps), marking phases
with `with timer("forward"): ...`. Under MPC every input is secret-shared first (src 0; who
owns what does not change the cost), one warm-up run is discarded, then each repeat records
per phase: seconds (wall-clock, and the process's CPU), and bytes and rounds from CrypTen's
own communication counters. `measure_each` measures several workloads in one set of parties.

    result = measure(build, run, config, parties=2, repeats=3)
    result.mpc["forward"].seconds   # party 0's timings per repeat
    result.plain["forward"]         # plaintext seconds per repeat, same process run

Set MPC_FT_BENCH_QUICK=1 for the CI smoke mode: fewer repeats and points (no timing asserted).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import TorchOps

QUICK = os.environ.get("MPC_FT_BENCH_QUICK") == "1"


def pick(quick: Any, full: Any) -> Any:
    return quick if QUICK else full


@dataclass
class Phase:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds, all threads
    bytes: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)


class Timer:
    """Times named phases (they may nest), in wall-clock and CPU seconds; under MPC also counts
    bytes and rounds, as the difference of CrypTen's cumulative counters across the phase."""

    def __init__(self, counting: bool) -> None:
        self.counting = counting
        self.phases: dict[str, Phase] = defaultdict(Phase)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        from mpc_ft import compat

        before = compat.communication_stats() if self.counting else None
        start, cpu = time.perf_counter(), time.process_time()
        yield
        phase = self.phases[name]
        phase.seconds.append(time.perf_counter() - start)
        phase.cpu.append(time.process_time() - cpu)
        if before is not None:
            after = compat.communication_stats()
            phase.bytes.append(after["bytes"] - before["bytes"])
            phase.rounds.append(after["rounds"] - before["rounds"])


def _mpc_party(rank: int, build: Callable, run: Callable, repeats: int,
               ops_options: dict[str, Any]) -> dict[str, Phase]:  # fmt: skip
    import crypten

    from mpc_ft.ops import MpcOps

    torch.manual_seed(0)
    ops = MpcOps(crypten, **ops_options)
    inputs = {k: crypten.cryptensor(v, src=0) for k, v in build().items()}
    run(inputs, ops, Timer(counting=True))  # warm-up: lazy imports, allocator, caches
    timer = Timer(counting=True)
    for _ in range(repeats):
        run(inputs, ops, timer)
    return dict(timer.phases)


def _busy(started: Any, stop: Any) -> None:
    torch.set_num_threads(1)
    a = torch.randint(-(2**40), 2**40, (512, 256))
    b = torch.randint(-(2**40), 2**40, (256, 256))
    started.set()
    while not stop.is_set():
        a @ b


@contextlib.contextmanager
def busy_process(timeout_s: float = 60) -> Iterator[None]:
    """One more process busy on the CPU while the block runs (int64 matrix products in a loop,
    one thread): the shortage of cores that a third party makes, without its messages."""
    context = multiprocessing.get_context("spawn")
    started, stop = context.Event(), context.Event()
    process = context.Process(target=_busy, args=(started, stop), daemon=True)
    process.start()
    try:
        if not started.wait(timeout_s):
            raise RuntimeError(f"the busy process did not start in {timeout_s:g} s")
        yield
    finally:
        stop.set()
        process.join(timeout_s)
        if process.is_alive():
            process.kill()


def _mpc_parties(rank: int, workloads: dict[Any, tuple[Callable, Callable]], repeats: int,
                 ops_options: dict[str, Any]) -> dict[Any, dict[str, Phase]]:  # fmt: skip
    return {key: _mpc_party(rank, build, run, repeats, ops_options)
            for key, (build, run) in workloads.items()}  # fmt: skip


def plaintext(build: Callable, run: Callable, repeats: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)  # as each MPC party has one thread
    inputs = build()
    run(inputs, TorchOps, Timer(counting=False))
    timer = Timer(counting=False)
    for _ in range(max(repeats, 5)):
        run(inputs, TorchOps, timer)
    return {name: phase.seconds for name, phase in timer.phases.items()}


@dataclass
class Result:
    mpc: dict[str, Phase]  # party 0's phases
    per_party: list[dict[str, Phase]]
    plain: dict[str, list[float]]

    def bytes_per_party(self, phase: str) -> list[float]:
        return [_median(p[phase].bytes) for p in self.per_party]

    def rounds_per_party(self, phase: str) -> list[float]:
        return [_median(p[phase].rounds) for p in self.per_party]

    def busiest_cpu(self, phase: str) -> list[float]:
        """Per repeat, the CPU seconds of the party that used the most: with a core per
        party, about what the phase would take if no party waited for messages."""
        return [max(cpus) for cpus in zip(*(p[phase].cpu for p in self.per_party), strict=True)]


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def measure(
    build: Callable,
    run: Callable,
    config: dict[str, Any],
    *,
    parties: int = 2,
    repeats: int = 3,
    timeout_s: float = 900,
    ops_options: dict[str, Any] | None = None,
    dealer_ahead: bool = True,
) -> Result:
    """The workload under MPC (parties + the dealer) and in plaintext, in this one run.
    `ops_options`: keyword arguments for MpcOps (e.g. reuse_openings=False); dealer_ahead:
    as run_multiparty's (False: the dealer idles while a step runs)."""
    return measure_each({None: (build, run, config)}, parties=parties, repeats=repeats,
                        timeout_s=timeout_s, ops_options=ops_options,
                        dealer_ahead=dealer_ahead)[None]  # fmt: skip


def measure_each(
    workloads: dict[Any, tuple[Callable, Callable, dict[str, Any]]],
    *,
    parties: int = 2,
    repeats: int = 3,
    timeout_s: float = 900,
    ops_options: dict[str, Any] | None = None,
    dealer_ahead: bool = True,
) -> dict[Any, Result]:
    """`measure` for each workload (key -> build, run, config), one after another in one set
    of party processes: their start-up (CrypTen, the links) is paid once, not per workload."""
    bound = {key: (functools.partial(build, **config), functools.partial(run, **config))
             for key, (build, run, config) in workloads.items()}  # fmt: skip
    per_party = run_multiparty(
        _mpc_parties, parties=parties, args=(bound, repeats, ops_options or {}),
        timeout_s=timeout_s, dealer_ahead=dealer_ahead,
    )  # fmt: skip
    return {
        key: Result(mpc=per_party[0][key], per_party=[p[key] for p in per_party],
                    plain=plaintext(build, run, repeats))
        for key, (build, run) in bound.items()
    }  # fmt: skip


def write_phase_row(case: str, result: Result, phase: str, **row: Any) -> dict[str, Any]:
    """One row for one phase of a measured workload (benchmarks/rows.py)."""
    from benchmarks.rows import write_row

    return write_row(
        case,
        phase=phase,
        seconds=result.mpc[phase].seconds,
        plaintext_seconds=result.plain[phase],
        bytes_per_party=result.bytes_per_party(phase),
        rounds_per_party=result.rounds_per_party(phase),
        **row,
    )
