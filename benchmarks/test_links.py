"""gloo against the direct links (mpc_ft/links.py, compat patch 19), side by side in one run.

    .venv/bin/pytest benchmarks/test_links.py -q     # MPC_FT_BENCH_QUICK=1: a few repeats

Same processes, same job: each party times its work with its links up, then with them taken
down (the communicator falls back to gloo: messages.py), alternately, so that a busy spell on
this shared machine falls on both. Cases, 2 and 3 computing parties plus the idle dealer:
- opening: one opening of 32 elements after ~1 ms of local work (a step's pattern: small
  openings between local products); party 0's seconds per opening, and their 90th percentile;
- step: the reference training step, exact and MPC-native, triples ahead (test_reference_head's
  online step); party 0's seconds.
Rows: benchmarks/results/links__*.json (group "links").
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Iterator

import pytest
import torch

from benchmarks.measure import _mpc_party, pick
from benchmarks.rows import write_row
from benchmarks.workloads import REFERENCE, head_build, head_run
from mpc_ft.multiparty import run_multiparty

ALTERNATIONS = pick(1, 3)


def _alternately() -> Iterator[str]:
    """Yields "links", then "gloo", ALTERNATIONS times: this party's links up, then taken down
    (the communicator falls back to gloo: messages.py); up again at the end."""
    import crypten.communicator as comm

    from mpc_ft import messages

    channel = comm.get()
    links = getattr(channel, messages.LINKS)
    try:
        for _ in range(ALTERNATIONS):
            setattr(channel, messages.LINKS, links)
            yield "links"
            delattr(channel, messages.LINKS)
            yield "gloo"
    finally:
        setattr(channel, messages.LINKS, links)


def _openings_party(rank: int, openings: int) -> dict[str, list[float]]:
    import crypten.communicator as comm

    share = torch.arange(32) * (rank + 1)
    seconds: dict[str, list[float]] = {"links": [], "gloo": []}
    for transport in _alternately():
        for _ in range(openings):
            start = time.perf_counter()
            while time.perf_counter() - start < 1e-3:  # local work between openings
                pass
            start = time.perf_counter()
            comm.get().all_reduce(share)
            seconds[transport].append(time.perf_counter() - start)
    return seconds


def _steps_party(rank: int, native: bool, repeats: int) -> dict[str, list[float]]:
    """measure.py's party (shared inputs, a warm-up, then `repeats` steps) per transport."""
    config = REFERENCE | {"native": native, "triples_ahead": True, "mode": "train"}
    build = functools.partial(head_build, **config)
    run = functools.partial(head_run, **config)
    seconds: dict[str, list[float]] = {"links": [], "gloo": []}
    for transport in _alternately():
        phases = _mpc_party(rank, build, run, repeats, {"triples_ahead": True})
        seconds[transport] += phases["step"].seconds
    return seconds


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def _row(case: str, parties: int, seconds: dict[str, list[float]], **extra: object) -> dict:
    ratio = statistics.median(seconds["gloo"]) / statistics.median(seconds["links"])
    return write_row(case, group="links", config={"parties": parties, **extra}, parties=parties,
                     seconds=seconds["links"], seconds_gloo=seconds["gloo"],
                     p90=_p90(seconds["links"]), p90_gloo=_p90(seconds["gloo"]),
                     gloo_over_links=ratio, dealer_ahead=False, **extra)  # fmt: skip


@pytest.mark.parametrize("parties", [2, 3])
def test_small_openings_over_links_and_gloo(benchmark, parties):
    out: list = []
    benchmark.pedantic(lambda: out.append(run_multiparty(
        _openings_party, parties=parties, args=(pick(20, 200),), dealer_ahead=False,
        timeout_s=600)), rounds=1, iterations=1)  # fmt: skip
    row = _row(f"links/opening-32/{parties}", parties, out[0][0], what="opening of 32 elements")
    assert row["gloo_over_links"] > 0


@pytest.mark.parametrize("variant", ["exact", "native"])
@pytest.mark.parametrize("parties", [2, 3])
def test_reference_step_over_links_and_gloo(benchmark, parties, variant):
    out: list = []
    benchmark.pedantic(lambda: out.append(run_multiparty(
        _steps_party, parties=parties, args=(variant == "native", pick(1, 10)),
        dealer_ahead=False, timeout_s=900)), rounds=1, iterations=1)  # fmt: skip
    row = _row(f"links/{variant}-step/{parties}", parties, out[0][0],
               what=f"{variant} step, triples ahead")  # fmt: skip
    assert row["gloo_over_links"] > 0
