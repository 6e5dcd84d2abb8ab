"""Protocols sharing exchanges (rounds.py) and the two-class cross-entropy built on them
(ops.two_class_parts): arithmetic and binary shares open together in one counted round, side by
side protocols take the rounds of the longest, and the two-class loss terms and gradient match
the plaintext twin for 2 and 3 parties, with the triples drawn ahead too, across logit gaps
where the unused exp overflows."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mpc_ft import cost_model as cm
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import TorchOps

# l1 - l0 from -500 (CrypTen's exp is garbage below -512) to 300; |gap| >= 15 overflows the exp
# that is not used
GAPS = torch.tensor([-500.0, -40, -12, -8.5, -7, -3, -0.5, -1e-4, 0, 1e-4, 0.5, 3, 7, 8.5, 12,
                     40, 300])  # fmt: skip


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    l0 = torch.linspace(-2, 2, len(GAPS)).unsqueeze(1)
    return torch.cat([l0, l0 + GAPS.unsqueeze(1)], 1), torch.eye(2)[torch.arange(len(GAPS)) % 2]


def _party(rank: int) -> dict:
    import crypten
    import crypten.communicator as comm

    from mpc_ft import compat, rounds
    from mpc_ft.offline import TripleCache
    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten)
    out = {}
    # one exchange of arithmetic and binary shares: sums and XORs, in the order given
    a, b = torch.arange(3) * (rank + 1), torch.full((2,), 1 << rank)
    before = compat.communication_stats()
    out["together"] = rounds.open_together([(a, False), (b, True), (a * 10, False)])
    after = compat.communication_stats()
    out["together_counted"] = (after["rounds"] - before["rounds"], after["bytes"] - before["bytes"])
    # side by side: three squarings and a product take three rounds
    x = crypten.cryptensor(torch.tensor([1.5, -0.5, 2.0]), src=0)
    y = crypten.cryptensor(torch.tensor([2.0, 4.0, -1.0]), src=1)

    def chain(t):
        for _ in range(3):
            t = yield from rounds.square_steps(t)
        return t

    with crypten.no_grad():
        before = compat.communication_stats()
        fourth, product = rounds.run(chain(x), rounds.mul_steps(x, y))
        after = compat.communication_stats()
    out["side_by_side"] = (fourth.get_plain_text(), product.get_plain_text())
    out["side_by_side_rounds"] = after["rounds"] - before["rounds"]
    # the two-class cross-entropy, on the fly and with a step's triples drawn ahead
    logits_in, onehot_in = _logits()
    onehot = crypten.cryptensor(onehot_in, src=comm.get().get_world_size() - 1)
    cache = TripleCache(crypten)
    runs = []
    for _ in range(3):  # on the fly; recorded; drawn ahead
        with cache.step() if runs else contextlib.nullcontext():
            logits = ops.leaf(crypten.cryptensor(logits_in, src=0))
            before = compat.communication_stats()
            offset, total = ops.cross_entropy_backward(logits, onehot)
            after = compat.communication_stats()
        runs.append((offset.get_plain_text(), total.get_plain_text(),
                     logits.grad.get_plain_text(), after["rounds"] - before["rounds"]))  # fmt: skip
    out["two_class"] = runs
    return out


@pytest.fixture(scope="module", params=[2, 3])
def results(request):
    return request.param, run_multiparty(_party, parties=request.param)


def test_sums_and_xors_open_in_one_counted_exchange(results):
    parties, per_party = results
    ranks = range(parties)
    for out in per_party:
        summed, xored, tens = out["together"]
        assert torch.equal(summed, torch.arange(3) * sum(r + 1 for r in ranks))
        assert torch.equal(xored, torch.full((2,), (1 << parties) - 1))
        assert torch.equal(tens, summed * 10)
        # one round; 8 elements sent to and received from each peer, as CrypTen counts openings
        assert out["together_counted"] == (1, 2 * (parties - 1) * 8 * 8)


def test_side_by_side_protocols_take_the_rounds_of_the_longest(results):
    parties, per_party = results
    x, y = torch.tensor([1.5, -0.5, 2.0]), torch.tensor([2.0, 4.0, -1.0])
    for rank, out in enumerate(per_party):
        fourth, product = out["side_by_side"]
        torch.testing.assert_close(fourth, x**8, atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(product, x * y, atol=1e-3, rtol=0)
        want = cm.merged((3 * cm.square(3, parties), 3), (cm.mul(3, parties), 1))
        assert out["side_by_side_rounds"] == want.party(rank)[1]
        if rank:  # no dealer calls: the 3 exchanges (and, with 3 parties, 4 folds)
            assert out["side_by_side_rounds"] == 3 + (4 if parties == 3 else 0)


def test_two_class_cross_entropy_matches_the_twin_across_gaps(results):
    parties, per_party = results
    logits_in, onehot = _logits()
    logits = logits_in.clone().requires_grad_(True)
    offset, total = TorchOps.cross_entropy_backward(logits, onehot)
    for rank, out in enumerate(per_party):
        for got_offset, got_total, grad, _ in out["two_class"]:
            torch.testing.assert_close(got_offset, offset, atol=1e-4, rtol=0)
            # exp's limit form (1 + z/256)^256 reads z^2/512 relative low, as in the general path
            torch.testing.assert_close(got_total, total, atol=1e-3, rtol=0)
            torch.testing.assert_close(grad, logits.grad, atol=1e-3, rtol=0)
        # on the fly: the cost model's count; from the cache: no dealer calls at party 0
        model = cm.cross_entropy_backward(len(GAPS), 2, parties).party(rank)[1]
        assert out["two_class"][0][3] == model
        if rank:
            assert {run[3] for run in out["two_class"]} == {model}


def test_two_class_rounds_against_the_general_path():
    # 2 parties: 8 side by side, 1 for the products by the bit, 4 for the reciprocal, 1 for p1
    assert cm.cross_entropy_backward(16, 2, 2).rounds == 14
    general = (cm.row_max(16, 2, 2) + cm.exp_nonpositive(32, 2, ndim=2)
               + cm.reciprocal_in_range(16, 2, 1.0, 2.0, ndim=2)
               + cm.mul(32, 2, y_numel=16, ndim=2) + cm.mul(32, 2, ndim=2))  # fmt: skip
    assert general.rounds == 23


def _two_class_only(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import crypten

    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten)
    logits_in, onehot = _logits()
    logits = ops.leaf(crypten.cryptensor(logits_in, src=0))
    offset, total = ops.cross_entropy_backward(logits, crypten.cryptensor(onehot, src=1))
    return offset.get_plain_text(), total.get_plain_text(), logits.grad.get_plain_text()


@pytest.mark.parametrize(("parties", "provider"), [(2, "TFP"), (4, "TTP")])
def test_two_class_cross_entropy_without_the_dealers_pairs_and_with_four_parties(parties, provider):
    """CrypTen's TFP (no bit pairs: products by the bit are CrypTen's own) and 4 parties
    (CrypTen's wrap-count truncation, on the overflowed exp too) give the same terms."""
    logits_in, onehot = _logits()
    logits = logits_in.clone().requires_grad_(True)
    offset, total = TorchOps.cross_entropy_backward(logits, onehot)
    results = run_multiparty(_two_class_only, parties=parties, provider=provider)
    for got_offset, got_total, grad in results:
        torch.testing.assert_close(got_offset, offset, atol=1e-4, rtol=0)
        torch.testing.assert_close(got_total, total, atol=1e-3, rtol=0)
        torch.testing.assert_close(grad, logits.grad, atol=1e-3, rtol=0)
