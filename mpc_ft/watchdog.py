"""Fixed-point overflow watchdog: find wrapped-around parameters on shares, revealing one number.

A value that leaves CrypTen's fixed-point range, or a product whose truncation fails (about
|x| 2^(2 bits - 64) per element, README "Known limits"), comes back as a wild number: ~4e9 at
16 fractional bits. Training then carries it into the parameters, where it stays.

Protocol, every `train.watchdog_every` steps, on the parameters after the update:
1. Per parameter tensor p, s = sum_i r_i p_i with public pseudo-random signs r_i = +-1 (seeded
   by the tensor's name): local on the raw shares (ops.signed_sum: exact in the ring; CrypTen's
   own product by a public tensor would wrap the very values sought).
   A healthy tensor gives |s| of order sqrt(numel) * |p|, far below BOUND = 2^24; one wild
   element gives |s| ~ 4e9.
2. One batched comparison of [s - BOUND, -s - BOUND] > 0 on shares; the number of tensors out
   of range is revealed to all (one scalar per check, in the reveal log as "watchdog").
3. Only when it is not 0 are the per-tensor flags revealed, to name the layer(s).
train.train then rolls back to the last state that passed (in memory) and retries the steps
with fresh randomness: a random truncation failure does not repeat. If the same check fails
MAX_RETRIES times in a row, training stops with Overflow, which names the tensors, the step,
and the fixes to try. Checkpoints are only written from states that passed the check.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from mpc_ft.errors import BadInput

BOUND = 2.0**24
MAX_RETRIES = 2


class Overflow(BadInput):
    """Training overflowed the fixed point again after rolling back (exit 2: fix the settings)."""


def signs(name: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Public +-1 integers (int64: CrypTen multiplies shares by them without truncation)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, 2, tuple(shape), generator=gen) * 2 - 1


def out_of_range(params: dict[str, Any], ops: Any, reveal_scalars: Any, step: int) -> list[str]:
    """Names of the parameter tensors whose signed sum leaves [-BOUND, BOUND] (steps 1-3)."""
    names = sorted(params)
    with ops.no_grad():
        sums = ops.stack([ops.signed_sum(params[n], signs(n, params[n].shape)) for n in names])
        flags = ops.cat([sums - BOUND, -sums - BOUND]) > 0
        (count,) = reveal_scalars([flags.sum()], f"watchdog step {step}")
        if count < 0.5:
            return []
        bits = reveal_scalars([flags[i] for i in range(2 * len(names))], f"watchdog step {step}")
    return [n for i, n in enumerate(names) if bits[i] + bits[len(names) + i] > 0.5]


def advice(names: list[str], step: int, retries: int) -> str:
    return (f"fixed-point overflow in {', '.join(names)} at step {step}, again after "
            f"{retries} rollback(s) to the last good state: lower train.lr, or clip the inputs "
            "(features far above ~1e3 in magnitude), or change mpc.precision_bits (fewer bits: "
            "more range; the default 16 is measured best); the last good checkpoint, if any, "
            "is kept for --resume")  # fmt: skip
