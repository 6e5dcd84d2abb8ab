"""Oblivious Poisson sampling (sampling.py): the draw, the slots, the dummies, the shares."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import binom

from mpc_ft import sampling, train
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import TorchOps


def _data(n=30, t=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(t) < torch.randint(1, t + 1, (n, 1), generator=g)).float()
    x = torch.randn(n, t, d, generator=g) * mask.unsqueeze(-1) + 10.0  # unlike the dummy
    y = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    return train.Dataset.counted(x, mask, y)


def test_each_example_is_drawn_independently_at_the_rate_into_uniform_slots():
    rng, n, rate, slots, trials = random.Random(1), 40, 0.2, 30, 4000
    drawn = torch.zeros(n)
    position = torch.zeros(slots)
    sizes = []
    for _ in range(trials):
        index = sampling.draw(n, rate, slots, rng)
        assert len(index) == slots and len({i for i in index if i >= 0}) == sum(
            i >= 0 for i in index
        )  # no example twice
        for pos, i in enumerate(index):
            if i >= 0:
                drawn[i] += 1
                position[pos] += 1
        sizes.append(sum(i >= 0 for i in index))
    # per example: Binomial(trials, rate); 5 sigma
    sigma = (trials * rate * (1 - rate)) ** 0.5
    assert (drawn - trials * rate).abs().max() < 5 * sigma
    # slots are used uniformly (random placement), and the batch size is Binomial(n, rate)
    assert (position / position.mean() - 1).abs().max() < 0.1
    mean = sum(sizes) / trials
    assert abs(mean - n * rate) < 5 * (n * rate * (1 - rate) / trials) ** 0.5


def test_more_drawn_than_slots_keeps_a_random_subset():
    rng = random.Random(2)
    kept = torch.zeros(10)
    for _ in range(500):
        index = sampling.draw(10, 1.0, 4, rng)
        assert sorted(index) != [-1] * 4 and -1 not in index and len(set(index)) == 4
        for i in index:
            kept[i] += 1
    assert (kept / 200 - 1).abs().max() < 0.3  # each kept with probability 4/10


def test_slots_are_the_fewest_with_overflow_below_the_bound():
    for n, rate, bound in [(1200, 32 / 1200, 1e-12), (600, 0.05, 1e-9), (50, 0.5, 1e-6)]:
        s = sampling.slots_for(n, rate, bound)
        assert binom.sf(s, n, rate) <= bound < binom.sf(s - 1, n, rate)
        assert sampling.overflow_probability(n, rate, s) == pytest.approx(binom.sf(s, n, rate))


def test_fill_puts_rows_and_weights_in_their_slots_and_public_dummies_elsewhere():
    data = _data()
    x, mask, y, inv, weight = sampling.fill(data, [3, -1, 7, -1])
    dummy = sampling.dummy_row(5, 4, 3)
    assert torch.equal(weight[:, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    for slot, i in ((0, 3), (2, 7)):
        assert torch.equal(x[slot], data.x[i]) and torch.equal(y[slot], data.y[i])
        assert torch.equal(mask[slot], data.mask[i]) and torch.equal(inv[slot], data.inv_count[i])
    for slot in (1, 3):  # data-independent: the same on every party, whatever the data
        assert torch.equal(x[slot], dummy.x[0]) and torch.equal(mask[slot], dummy.mask[0])
        assert torch.equal(y[slot], dummy.y[0]) and inv[slot].item() == pytest.approx(1 / 5)


def test_the_twins_batches_concatenate_every_owners_slots():
    owners = [_data(n=20, seed=1), _data(n=30, seed=2)]
    source = sampling.PoissonBatches.plain(owners, slots=[6, 9], rate=0.2, seed=0)
    assert len(source) == 50 and source.counts == [20, 30]
    x, mask, y, inv, weight = source.batch(TorchOps)
    assert x.shape == (15, 5, 4) and mask.shape == (15, 5) and weight.shape == (15, 1)
    real = weight[:, 0].bool()
    # every real row is one of its owner's examples (features are offset by 10: not a dummy)
    assert (x[real].mean((1, 2)) > 5).all() and (x[~real].mean((1, 2)).abs() < 1).all()
    assert real[:6].sum() <= 6 and real[6:].sum() <= 9


def _party(rank, data):
    import crypten

    from mpc_ft.ops import MpcOps
    from mpc_ft.sharing import share

    mine = data if rank == 1 else None  # the data owner is rank 1
    source = sampling.PoissonBatches([(1, len(data), mine)], [8], 0.25, (5, 4, 3),
                                     share=lambda v, shape, src: share(crypten, v, shape, src),
                                     rng=random.Random(5) if rank == 1 else None)  # fmt: skip
    batch = source.batch(MpcOps(crypten))
    return [t.get_plain_text() for t in batch]


def test_under_mpc_only_the_owner_draws_and_the_shares_open_to_its_rows():
    data = _data(n=24)
    opened = run_multiparty(_party, parties=2, args=(data,))
    expected = sampling.fill(data, sampling.draw(24, 0.25, 8, random.Random(5)))
    for got in opened:  # both parties open the same batch: the owner's draw, to fixed point
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
