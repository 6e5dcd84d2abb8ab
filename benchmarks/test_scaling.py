"""Scaling curves: the reference training step with one dimension varied at a time.

    make bench   (or: .venv/bin/pytest benchmarks/test_scaling.py)

Series: batch size, sequence length, d_model (FFN = 2 d_model), number of blocks, number of
computing parties (2, 3, 4, each with the dealer), and number of training examples (one epoch
in batches of 16). Each point is a row with `series` and `x`; the report plots each series.
Quick mode (MPC_FT_BENCH_QUICK=1) runs one point of each series once.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.measure import measure, pick, write_phase_row
from benchmarks.workloads import REFERENCE, head_build, head_run
from mpc_ft import train
from mpc_ft.config import TrainConfig

SERIES = {
    "batch": [8, 16, 32, 64],
    "tokens": [16, 32, 64],
    "d_model": [64, 128, 256],
    "blocks": [1, 2, 3],
    "parties": [2, 3, 4],
    "examples": [32, 64, 128],
}
# Quick: every series once (4 parties: the largest world size is the likeliest to break).
POINTS = [
    (s, x) for s, xs in SERIES.items() for x in pick(xs[-1:] if s == "parties" else xs[:1], xs)
]


def epoch_build(*, examples: int, **config) -> dict[str, torch.Tensor]:
    return head_build(**(config | {"batch": examples}))


def epoch_run(inputs, ops, timer, *, d_model, heads, ffn, blocks, examples, **_):
    """One epoch over `examples` examples in batches of 16 (train.train, reveals included)."""
    from mpc_ft import head as head_def

    cfg = head_def.HeadConfig(d_model=d_model, num_heads=heads, d_ffn=ffn, num_blocks=blocks,
                              project_input=False)  # fmt: skip
    params = {k[2:]: v for k, v in inputs.items() if k.startswith("p.")}
    data = train.Dataset(inputs["x"], inputs["mask"], inputs["y"])
    sgd = TrainConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0)
    reveal = train.plaintext_reveal if ops.name == "plaintext" else _reveal
    with timer("epoch"):
        train.train(params, data, head=cfg, train_cfg=sgd, ops=ops, reveal_scalars=reveal)


def _reveal(values, what):
    return [float(v.get_plain_text()) for v in values]


@pytest.mark.parametrize(("series", "x"), POINTS, ids=[f"{s}={x}" for s, x in POINTS])
def test_scaling(benchmark, series, x):
    config = dict(REFERENCE)
    parties = x if series == "parties" else 2
    if series == "d_model":
        config |= {"d_model": x, "ffn": 2 * x}
    elif series in config:
        config[series] = x
    if series == "examples":
        build, run, phase = epoch_build, epoch_run, "epoch"
        config["examples"] = x
    else:
        build, run, phase = head_build, head_run, "step"
        config["mode"] = "train"
    result = benchmark.pedantic(measure, args=(build, run, config),
                                kwargs={"parties": parties, "repeats": pick(1, 3)},
                                rounds=1, iterations=1)  # fmt: skip
    write_phase_row(f"scaling/{series}/{x}", result, phase, group="scaling", config=config,
                    parties=parties, series=series, x=x)  # fmt: skip
