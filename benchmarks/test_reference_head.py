"""The reference head step (shared/DESIGN.md, the SPU peer case): MPC vs the plaintext twin.

    make bench                     # or: .venv/bin/pytest benchmarks -q

One post-LN block on width-128 inputs (no projection), batch 16, 32 tokens (rows 0-7 padded in
their last 8 positions), 2 heads, FFN 256, GELU (tanh form), masked attention and mean pooling,
2 classes, cross-entropy, plain SGD lr 0.1. One JSON row per case goes to benchmarks/results/.
The full suite (components, scaling, cost model, WAN) is issue 4; this file is its seed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mpc_ft import head as head_def
from mpc_ft import train
from mpc_ft.config import HeadConfig, TrainConfig
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import MpcOps, TorchOps

HEAD = HeadConfig(d_model=128, num_heads=2, d_ffn=256, num_blocks=1, project_input=False)
SGD = TrainConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0)
STEPS = 3
RESULTS = Path(__file__).parent / "results"


def reference_batch() -> tuple[dict[str, torch.Tensor], train.Dataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, 128, generator=g)
    mask = torch.ones(16, 32)
    mask[:8, 24:] = 0
    y = torch.nn.functional.one_hot(torch.randint(0, 2, (16,), generator=g), 2).float()
    return head_def.init_params(HEAD, 128, 2, seed=0), train.Dataset(x, mask, y)


def step(params, data, ops):
    params = {k: ops.leaf(v) for k, v in params.items()}
    loss = ops.cross_entropy(head_def.forward(params, data.x, data.mask, HEAD, ops), data.y)
    loss.backward()
    return train.sgd_step(params, {}, SGD, ops)[0]


def _mpc_party(rank, params, data, steps):
    import crypten

    from mpc_ft import compat

    ops = MpcOps(crypten)
    shared = {k: crypten.cryptensor(v, src=1) for k, v in params.items()}
    sdata = train.Dataset(*(crypten.cryptensor(t, src=0) for t in (data.x, data.mask, data.y)))
    seconds = []
    compat.reset_communication_stats()
    for _ in range(steps):
        start = time.perf_counter()
        shared = step(shared, sdata, ops)
        seconds.append(time.perf_counter() - start)
    stats = compat.communication_stats()
    return {"seconds": seconds, "bytes": stats["bytes"] / steps, "rounds": stats["rounds"] / steps}


def _row(case: str, **fields) -> None:
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    row = {"case": case, "git_revision": revision, "date": time.strftime("%Y-%m-%d"), **fields}
    (RESULTS / f"{case}.json").write_text(json.dumps(row, indent=2))


@pytest.mark.parametrize("parties", [2, 3])
def test_reference_step_mpc_vs_plaintext(benchmark, parties):
    params, data = reference_batch()
    torch.set_num_threads(1)
    plain = []
    for _ in range(20):
        start = time.perf_counter()
        step(params, data, TorchOps)
        plain.append(time.perf_counter() - start)
    results = benchmark.pedantic(
        run_multiparty, args=(_mpc_party,), kwargs={"parties": parties,
        "args": (params, data, STEPS)}, rounds=1, iterations=1,
    )  # fmt: skip
    mpc = results[0]["seconds"]
    row = {
        "parties": parties,
        "provider": "TTP",
        "seconds_median": statistics.median(mpc),
        "seconds_spread": [min(mpc), max(mpc)],
        "plaintext_seconds_median": statistics.median(plain),
        "ratio_to_plaintext": statistics.median(mpc) / statistics.median(plain),
        "mib_sent_per_party": [r["bytes"] / 2**20 for r in results],
        "rounds_per_party": [r["rounds"] for r in results],
    }
    benchmark.extra_info.update(row)
    _row(f"reference_step_{parties}p_ttp", **row)
    assert row["seconds_median"] > 0
