"""LAN and WAN: the reference head step with every process on its own emulated host.

    .venv/bin/pytest benchmarks/test_network.py -q      # MPC_FT_BENCH_QUICK=1: 1 step, not 3

The step of test_reference_head.py (`step` on `reference_batch()`), 2 computing parties + the
TTP dealer, each process in its own network namespace on one bridge (tests/netns.py; needs root,
skipped with the reason otherwise). Rows: benchmarks/results/network__{lan,wan}.json.

Emulation. Bandwidth is real: `tc tbf` on every host's link, both directions, at the profile's
rate. Latency is NOT (this kernel has no netem): `compat.emulate_latency` makes each computing
party sleep RTT/2 before each CrypTen round, i.e. each communicator call CrypTen counts (here
all_reduce, and party 0's send_obj, recv_obj, broadcast with the dealer). The dealer sleeps
none: party 0, the only party it talks to, already pays for that link.

Model, per step (each term is in the row's "model"):
    predicted = compute + rounds * RTT/2 + transfer - burst credit - dealer overlap
- compute: the same step unshaped on loopback (median), run first by this module;
- rounds: party 0's CrypTen rounds, the critical path: each all_reduce party 1 also makes, plus
  3 per dealer request (one request per all_reduce in this step);
- transfer: the bytes on the busiest link direction, party 0's downlink, x FRAME / rate. From
  CrypTen's count of each call: half of an all_reduce (CrypTen counts 2n elements, sent plus
  received; gloo's 2-rank ring moves n each way on a full-duplex link), all of a broadcast from
  the dealer or a recv_obj. CrypTen's total instead ("naive" in the row) charges party 0's sent
  bytes too, serially: ~25% slow at WAN. FRAME = 1514/1448: tbf charges Ethernet, IP and TCP
  headers per 1448-byte segment (goodput measured here: 95.7 Mbit/s at 100mbit);
- burst credit: tbf lets min(message, bucket) bytes of each message pass at veth speed when its
  bucket is full (after every sleep at WAN): the reason for WAN's 8 KiB bucket; LAN needs 128 KiB
  to reach 1 Gbit/s at all here (32 KiB gave 50-75%);
- dealer overlap: the sleep before party 0's recv_obj hides the dealer's triple generation, up to
  RTT/2 per request (its length: party 0's recv_obj times in the loopback run). A real link
  would not hide it: an artefact of sleeping at the caller.

Measured (2-core sandbox shared with other jobs; 3 steps; each row records its git revision):
    profile                      measured  predicted  (compute + latency + transfer - credits)
    LAN  1 Gbit/s, 0.2 ms RTT    3.50 s    3.63 s     2.07 + 0.09 + 1.73 - 0.27
    WAN  100 Mbit/s, 40 ms RTT  37.41 s   36.58 s     2.07 + 17.92 + 17.33 - 0.74
  per step and party (0, 1): rounds 896, 224; CrypTen bytes 326.8 MB, 239.2 MB; party 0's
  downlink carries 207.1 MB of payload. Quick mode 53-60 s for the file, full ~2.5 min.
Over 6 runs of the file, measured / predicted: WAN 0.97-1.03 every time; LAN 0.93-1.45, beyond
25% twice. LAN is mostly compute, so at the mercy of this shared machine: in the one of those
runs with per-call times, party 0's dealer calls (send_obj, recv_obj: pickling and the dealer's
triple generation, pure CPU) took 1.6-3x their loopback time. WAN is mostly latency (rounds x
20 ms) and transfer. Not modelled: TCP ACKs for party 0's own sends share its downlink (~1.5%
more bytes: see interface_bytes_per_party, /proc/net/dev of each namespace).

What one emulated round is, on a real link. The openings, gathers and folds travel over the
computing parties' direct links (mpc_ft/links.py): each party sends at once and reads its peers'
messages, so an exchange costs one one-way delay, RTT/2, as emulated. The dealer's requests still
go over gloo, whose TCP transport is receiver-driven (a send waits for the receiver's
ready-to-receive notice; gloo transport/tcp/pair.cc): about 4 RTT for send_obj, recv_obj and
broadcast (3 rounds here) against 1.5 RTT emulated; with triples ahead that is one request per
step. TCP slow start after idle is not emulated either. The WAN rows are a lower bound for this
stack on a real WAN; the emulation is faithful to CrypTen's own round count, which is what cost
models built on it assume.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.rows import write_row
from benchmarks.test_reference_head import reference_batch, share_reference, step
from mpc_ft import train
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import MpcOps
from tests.netns import isolated_hosts, require_netns

QUICK = os.environ.get("MPC_FT_BENCH_QUICK") == "1"
STEPS = 1 if QUICK else 3
HOSTS = ("party0", "party1", "dealer")  # ranks 0 and 1, then the dealer (rank 2)
FRAME = 1514 / 1448  # bytes tbf charges per TCP payload byte (MTU 1500, TCP timestamps)
# Which share of CrypTen's byte count of a call arrives on party 0's link (see the docstring).
RECEIVED = {"all_reduce": 0.5, "broadcast": 1.0, "recv_obj": 1.0, "send_obj": 0.0}


@dataclass(frozen=True)
class Profile:
    name: str
    rate: str  # for tc
    bits_per_s: float
    rtt_s: float
    burst: int  # tbf bucket, bytes: the smallest that still reaches `rate` here

    @property
    def seconds_per_round(self) -> float:
        return self.rtt_s / 2


PROFILES = [
    Profile("lan", "1gbit", 1e9, 0.2e-3, 128 * 1024),  # 32 KiB reached only 50-75% of 1gbit
    Profile("wan", "100mbit", 100e6, 40e-3, 8 * 1024),
]


def _interface_bytes() -> tuple[int, int]:
    """(received, sent) bytes of gloo's interface, from this network namespace's /proc/net/dev."""
    name = os.environ.get("GLOO_SOCKET_IFNAME")
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        iface, fields = line.split(":", 1)
        if iface.strip() == name:
            return int(fields.split()[0]), int(fields.split()[8])
    return 0, 0  # loopback: lo is shared with everything else, not ours to count


def _party(rank: int, params: dict, data: train.Dataset, steps: int) -> dict[str, Any]:
    import crypten

    from mpc_ft import compat

    ops = MpcOps(crypten)
    shared, sdata = share_reference(crypten, params, data, params_src=1)
    shared = {k: ops.leaf(v) for k, v in shared.items()}
    seconds, calls = [], []
    compat.reset_communication_stats()
    before = _interface_bytes()
    for _ in range(steps):
        with compat.emulate_latency(0.0) as step_calls:  # records the rounds, adds no delay
            start = time.perf_counter()
            shared = step(shared, sdata, ops)
            seconds.append(time.perf_counter() - start)
        calls.append(step_calls)
    stats = compat.communication_stats()
    wire = [(a - b) / steps for a, b in zip(_interface_bytes(), before, strict=True)]
    shapes = {tuple((name, nbytes) for name, nbytes, _ in step_calls) for step_calls in calls}
    return {"seconds": seconds, "bytes": stats["bytes"] / steps, "rounds": stats["rounds"] / steps,
            "calls": calls[0], "same_calls_every_step": len(shapes) == 1,
            "interface_bytes": wire}  # fmt: skip


def by_method(calls: list[tuple[str, int, float]]) -> dict[str, dict[str, float]]:
    """Per communicator method: calls, CrypTen's bytes and seconds inside the calls."""
    out: dict[str, dict[str, float]] = {}
    for name, nbytes, seconds in calls:
        entry = out.setdefault(name, {"calls": 0, "bytes": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["bytes"] += nbytes
        entry["seconds"] += seconds
    return out


def predict(profile: Profile, loopback: list[dict], shaped: list[dict]) -> dict[str, float]:
    """The cost model of the module docstring, term by term (seconds per step)."""
    calls = shaped[0]["calls"]
    unknown = {name for name, _, _ in calls} - RECEIVED.keys()
    assert not unknown, f"the model does not know which way {unknown} move bytes"
    received = [RECEIVED[name] * nbytes for name, nbytes, _ in calls]
    rate, delay = profile.bits_per_s / 8, profile.seconds_per_round
    dealer = [seconds for name, _, seconds in loopback[0]["calls"] if name == "recv_obj"]
    terms = {
        "compute": statistics.median(loopback[0]["seconds"]),
        "latency": max(r["rounds"] for r in shaped) * delay,
        "transfer": sum(received) * FRAME / rate,
        "burst_credit": -sum(min(b * FRAME, profile.burst) for b in received if b) / rate,
        "dealer_overlap": -sum(min(delay, seconds) for seconds in dealer),
    }
    naive = terms["compute"] + terms["latency"] + shaped[0]["bytes"] / rate
    return terms | {"predicted": sum(terms.values()), "naive": naive,
                    "received_bytes": sum(received)}  # fmt: skip


@pytest.fixture(scope="module")
def loopback() -> list[dict]:
    """The compute term: the same step, same steps, unshaped on loopback, in this run."""
    require_netns()  # skip (or fail under MPC_FT_REQUIRE_NETNS=1) before spending time here
    params, data = reference_batch()
    return run_multiparty(_party, parties=2, args=(params, data, STEPS))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_reference_step_over_network(benchmark, loopback, profile):
    params, data = reference_batch()
    names = list(HOSTS)
    with isolated_hosts(names, shaped=names, rate=profile.rate, burst=f"{profile.burst}b") as h:
        hosts = {rank: (h[n].namespace, h[n].address, h[n].interface)
                 for rank, n in enumerate(names)}  # fmt: skip
        results = benchmark.pedantic(run_multiparty, args=(_party,), kwargs={
            "parties": 2, "args": (params, data, STEPS), "hosts": hosts,
            "latency_s": profile.seconds_per_round}, rounds=1, iterations=1)  # fmt: skip
    assert all(r["same_calls_every_step"] for r in results)
    model = predict(profile, loopback, results)
    measured = statistics.median(results[0]["seconds"])
    row = write_row(
        f"network/{profile.name}", group="network", parties=2,
        config={"workload": "reference_step", "profile": profile.name, "steps": STEPS},
        seconds=results[0]["seconds"], plaintext_seconds=None,
        bytes_per_party=[r["bytes"] for r in results],
        rounds_per_party=[r["rounds"] for r in results],
        profile=profile.name, bandwidth_bit_s=profile.bits_per_s, rtt_s=profile.rtt_s,
        latency_per_round_s=profile.seconds_per_round, tbf_burst_bytes=profile.burst,
        measured_seconds=measured, predicted_seconds=model["predicted"],
        measured_over_predicted=measured / model["predicted"], model=model,
        loopback_seconds=loopback[0]["seconds"],
        seconds_per_party=[r["seconds"] for r in results],
        interface_bytes_per_party=[r["interface_bytes"] for r in results],
        calls_per_party=[by_method(r["calls"]) for r in results],
        loopback_calls_per_party=[by_method(r["calls"]) for r in loopback],
    )  # fmt: skip
    benchmark.extra_info.update(measured=measured, predicted=model["predicted"])
    if not QUICK:  # a broken emulation (no shaping, no delay), not a precision target
        assert 0.5 < row["measured_over_predicted"] < 2, row
