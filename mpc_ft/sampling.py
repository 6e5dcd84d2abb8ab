"""Oblivious Poisson sampling for DP-SGD: each data owner picks its batch rows in private.

The accountant (dp.spend) assumes Poisson sampling: at every step, every training example
joins the batch independently with probability q = train.batch_size / N (N: all owners'
examples). Under MPC the batch is drawn so that nobody but an example's own data owner learns
whether it was drawn, and nobody learns how many were:

1. Each data owner k has s_k public slots per step (dp.spend sizes them from its public
   example count n_k; `slots_for`).
2. Per step, owner k draws its own examples with probability q each from os.urandom
   (`draw`), puts them in uniformly random slots and fills the other slots with a public
   dummy row (`dummy_row`: data-independent) of weight 0.
3. It secret-shares the slots' features, masks, labels, inverse token counts and 0/1 weights
   (sharing.share: no message is sent); the batch is all owners' slots, in rank order.
4. DP-SGD multiplies each row's loss gradient by its weight (dp.clipped_sum): a dummy row
   contributes nothing, whatever it holds.

Why this is the Poisson-sampled mechanism: add one example i to owner k's data. Couple the two
runs on the same draws of every other example and the same placement; i, if drawn, takes a
uniformly random free slot (placing s + 1 items uniformly at random is placing s of them, then
one in a random free slot). The runs then differ in one slot only: a dummy of weight 0 becomes
i with weight 1, so one clipping unit (an example, or the microbatch holding that slot) changes.
The coupling fails only when more than s_k are drawn (a random s_k are then kept); the
probability of that anywhere in training, eta, goes into delta (dp.spend: delta' = delta +
(1 + e^epsilon) eta, a total-variation argument), and s_k is chosen to make it 1% of delta.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpc_ft.train import Dataset

DUMMY_SEED = 20261130  # public: the dummy row is the same on every party and in the twin


def overflow_probability(n: int, rate: float, slots: int) -> float:
    """P(more than `slots` of n examples are drawn at `rate`) = P(Binomial(n, rate) > slots)."""
    from scipy.stats import binom

    return float(binom.sf(slots, n, rate))


def slots_for(n: int, rate: float, max_overflow: float) -> int:
    """The fewest slots whose overflow probability per step is at most `max_overflow`."""
    from scipy.stats import binom

    slots = int(binom.isf(max_overflow, n, rate))  # isf may land one short or long
    while slots > 0 and overflow_probability(n, rate, slots - 1) <= max_overflow:
        slots -= 1
    while overflow_probability(n, rate, slots) > max_overflow:
        slots += 1
    return min(max(slots, 1), n)


def draw(n: int, rate: float, slots: int, rng: random.Random) -> list[int]:
    """One step's Poisson sample of range(n), in uniformly random slots: slot -> example index,
    -1 for a dummy. More than `slots` drawn: a uniformly random `slots` of them are kept.
    `rng`: random.SystemRandom() (os.urandom) in a party; a seeded random.Random in tests."""
    picked = [i for i in range(n) if rng.random() < rate]
    if len(picked) > slots:
        picked = rng.sample(picked, slots)
    index = [-1] * slots
    for position, example in zip(rng.sample(range(slots), len(picked)), picked, strict=True):
        index[position] = example
    return index


@functools.cache
def dummy_row(tokens: int, width: int, classes: int) -> Dataset:
    """The public filler of an empty slot: standard normal features (the scale of a hidden
    state, so that normalisation stays well conditioned), every token real, label 0. Made once
    per shape (every step fills slots with it; callers only read it)."""
    gen = torch.Generator().manual_seed(DUMMY_SEED)
    x = torch.randn(1, tokens, width, generator=gen)
    y = torch.zeros(1, classes)
    y[0, 0] = 1.0
    return Dataset.counted(x, torch.ones(1, tokens), y)


def fill(data: Dataset, index: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The slots' plaintext rows: x, mask, y, inv_count and weight [slots,1] (1 real, 0 dummy)."""
    dummy = dummy_row(data.x.size(1), data.x.size(2), data.y.size(1))
    inv = data.inv_count if data.inv_count is not None else 1.0 / data.mask.sum(1, keepdim=True)
    rows = torch.tensor([max(i, 0) for i in index])
    real = torch.tensor([[float(i >= 0)] for i in index])
    out = []
    for full, filler in zip(
        (data.x, data.mask, data.y, inv),
        (dummy.x, dummy.mask, dummy.y, dummy.inv_count),
        strict=True,
    ):
        picked = full.index_select(0, rows)
        keep = real.reshape(-1, *([1] * (picked.dim() - 1)))
        out.append(picked * keep + filler * (1 - keep))
    return (*out, real)


# Shares one owner's plaintext tensor (None on the other parties) of a public shape from rank src
Share = Callable[[torch.Tensor | None, tuple[int, ...], int], Any]


@dataclass
class PoissonBatches:
    """DP training's batch source: every step a fresh oblivious Poisson batch (module doc).

    owners: per data owner, in rank order, (rank, its example count, its plaintext Dataset on
    that owner's own process or in the twin, else None). share: sharing.share under MPC; None
    in the twin (plaintext batches). Each batch: x, mask, y, inv_count, weight."""

    owners: list[tuple[int, int, Dataset | None]]
    slots: Sequence[int]
    rate: float
    shape: tuple[int, int, int]  # tokens, feature width, classes (public)
    share: Share | None = None
    rng: random.Random | None = None  # None: random.SystemRandom() (os.urandom)

    def __post_init__(self) -> None:
        if self.rng is None:
            self.rng = random.SystemRandom()

    @property
    def counts(self) -> list[int]:
        return [n for _, n, _ in self.owners]

    def __len__(self) -> int:
        return sum(self.counts)

    def batch(self, ops: Any) -> tuple[Any, ...]:
        tokens, width, classes = self.shape
        fields: list[list[Any]] = [[] for _ in range(5)]
        for (rank, n, data), slots in zip(self.owners, self.slots, strict=True):
            rows = None if data is None else fill(data, draw(n, self.rate, slots, self.rng))
            if self.share is None:
                assert rows is not None, "the twin holds every owner's data"
                values = rows
            else:
                shapes = ((slots, tokens, width), (slots, tokens), (slots, classes),
                          (slots, 1), (slots, 1))  # fmt: skip
                mine = rows or (None,) * 5
                values = tuple(self.share(r, s, rank) for r, s in zip(mine, shapes, strict=True))
            for f, v in zip(fields, values, strict=True):
                f.append(v)
        return tuple(f[0] if len(f) == 1 else ops.cat(f) for f in fields)

    @classmethod
    def plain(
        cls, owners: Sequence[Dataset], slots: Sequence[int], rate: float, seed: int | None = None
    ) -> PoissonBatches:
        """The twin's source over each owner's plaintext data (seeded: reproducible)."""
        first = owners[0]
        shape = (first.x.size(1), first.x.size(2), first.y.size(1))
        rng = None if seed is None else random.Random(seed)
        return cls([(r, len(d), d) for r, d in enumerate(owners)], slots, rate, shape, rng=rng)
