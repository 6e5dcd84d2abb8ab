"""The sign by a carry-only adder on packed bits (compare.py): bit tricks in plaintext, then
x < 0 on shares for 2 and 3 parties against torch, with its cost against CrypTen's."""

from __future__ import annotations

import pytest
import torch

from mpc_ft import compare
from mpc_ft import cost_model as cm
from mpc_ft.multiparty import run_multiparty
from mpc_ft.rounds import run as run_steps


def test_masks_and_order():
    assert compare._lo_mask(1) == 0x5555555555555555
    assert compare._lo_mask(32) == 0xFFFFFFFF
    assert compare._lo_mask(2) == 0x3333333333333333
    assert compare._bit_reverse(1) == 32 and compare._bit_reverse(6) == 24
    assert sorted(compare.ORDER.tolist()) == list(range(64))


def test_carry_sign_on_plain_words(monkeypatch):
    """One party's view with the AND in the clear: the top bit of a + b mod 2^64, for random
    words, carries that run the whole width, and sizes that are no multiple of 64."""

    def plain_and(x, y):
        return x & y
        yield  # a protocol of no openings

    monkeypatch.setattr(compare, "_and_steps", plain_and)
    g = torch.Generator().manual_seed(0)
    for n in (1, 63, 64, 130):
        a = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
        b = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
        a[0], b[0] = -1, 1  # 0: a carry through all 64 bits
        if n > 1:
            a[1], b[1] = 2**62, 2**62  # overflow into the sign
        want = ((a + b) < 0).long()
        assert torch.equal(run_steps(compare.carry_sign_steps(a, b))[0], want), n


def test_pack_and_unpack_bits():
    g = torch.Generator().manual_seed(2)
    for n in (1, 63, 64, 65, 200):
        bits = torch.randint(0, 2, (n,), generator=g)
        bits[-1] = 1  # the top bit of a word (n = 64) is the sign of an int64
        words = compare.pack(bits)
        assert words.numel() == -(-n // 64)
        assert torch.equal(compare.unpack(words, n), bits), n
    assert compare.pack(torch.ones(64, dtype=torch.long)).item() == -1


def test_count_wraps_equals_cryptens():
    """compare.count_wraps (compat patch 15) against CrypTen's own, for 2 to 4 terms, with
    sums that wrap up, down and not at all, and the extremes."""
    from mpc_ft import compat

    compat.import_crypten()
    from crypten.common.util import count_wraps

    g = torch.Generator().manual_seed(5)
    for terms in (2, 3, 4):
        shares = [torch.randint(-(2**63), 2**63 - 1, (1000,), generator=g) for _ in range(terms)]
        shares[0][:4] = torch.tensor([2**63 - 1, -(2**63), 0, 5])
        shares[1][:4] = torch.tensor([1, -1, 0, -6])
        want = count_wraps(shares)
        assert torch.equal(compare.count_wraps(shares), want), terms
        assert set(want.unique().tolist()) >= {-1, 0, 1}


def _ltz_party(rank, values):
    import crypten

    from mpc_ft import compat

    x = crypten.cryptensor(values, src=0)
    before = compat.communication_stats()
    bit = x < 0
    after = compat.communication_stats()
    relu = x.relu()
    return (bit.get_plain_text(), relu.get_plain_text(), bit.encoder.scale,
            after["bytes"] - before["bytes"], after["rounds"] - before["rounds"])  # fmt: skip


@pytest.mark.parametrize("parties", [2, 3])
def test_ltz_on_shares_matches_torch(parties):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(5, 7, 3, generator=g) * 100
    values[0, 0, :] = torch.tensor([0.0, -1.0 / 65536, 1.0 / 65536])
    values[1, 0, :2] = torch.tensor([-30000.0, 30000.0])
    results = run_multiparty(_ltz_party, parties=parties, args=(values,))
    bit, relu, scale, _, _ = results[0]
    assert torch.equal(bit, (values < 0).float())
    assert torch.allclose(relu, values.relu(), atol=1e-3)
    assert scale == 1
    # the cost model's count, for every party (party 0 also fetches 8 tuples from the dealer)
    model = cm.ltz(values.numel(), parties, ndim=3)
    for rank, (*_, nbytes, rounds) in enumerate(results):
        assert (nbytes, rounds) == model.party(rank), rank
    assert model.rounds == (8 if parties == 2 else 9)  # CrypTen's own: 8 and 15
    # 105 elements, padded to 128 words: 128 + 128 + 64 + ... + 4 AND-words (4 counted each),
    # and the bits' 2 packed words for the B2A (2 counted each): against CrypTen's 54 per element
    if parties == 2:
        assert model.bytes == 8 * (4 * (128 + 252) + 2 * 2) < 8 * 54 * 105


def _tfp_party(rank, values):
    import crypten

    from mpc_ft.ops import MpcOps

    MpcOps(crypten)
    x = crypten.cryptensor(values, src=0)
    return (x < 0).get_plain_text(), (x * 0.5).get_plain_text()


@pytest.mark.parametrize("parties", [2, 3])
def test_ltz_and_truncation_under_tfp(parties):
    # CrypTen's insecure TFP provider (a job must allow it) shares the B2A's random bit with
    # random high bits: the packed opening takes bit 0 of each share (it read them all, and
    # 2 and 3 parties got wrong signs); 3-party TFP products were ~1.0 off before the fold
    values = torch.linspace(-5, 5, 41)
    bit, half = run_multiparty(_tfp_party, parties=parties, provider="TFP", args=(values,))[0]
    assert torch.equal(bit, (values < 0).float())
    assert torch.allclose(half, values * 0.5, atol=1e-4)


def _bit_pair_party(rank):
    """Open every share of a dealer bit pair: the relations must hold in the ring."""
    import crypten
    import crypten.communicator as comm
    from crypten.mpc.primitives import BinarySharedTensor

    from mpc_ft.ops import MpcOps

    MpcOps(crypten)  # registers the provider's method (compat patch 12)
    provider = crypten.mpc.get_default_provider()
    r, r_binary, a0, a1, c0, c1 = getattr(provider, compare.BIT_PROVIDER_METHOD)(
        torch.Size([5, 3]), 2
    )
    opened = [comm.get().all_reduce(t.clone()) for t in (r, a0, a1, c0, c1)]
    return [*opened, BinarySharedTensor.from_shares(r_binary).reveal()]


@pytest.mark.parametrize("parties", [2, 3])
def test_the_dealer_makes_bit_pairs(parties):
    r, a0, a1, c0, c1, r_binary = run_multiparty(_bit_pair_party, parties=parties)[0]
    assert torch.equal(r, r_binary) and set(r.unique().tolist()) <= {0, 1}
    assert 0 < r.sum() < r.numel()  # 15 random bits: not all equal (fixed seeds)
    assert torch.equal(c0, a0 * r) and torch.equal(c1, a1 * r)
    assert not torch.equal(a0, a1)


def _bit_products_party(rank, x, ys):
    import crypten

    from mpc_ft import compat
    from mpc_ft.ops import MpcOps

    MpcOps(crypten)
    sx = crypten.cryptensor(x, src=0)
    sys_ = [crypten.cryptensor(y, src=1) for y in ys]
    neg, by_neg = compare.negative(sx, len(ys))
    costs, out = [], []
    for y in sys_:
        before = compat.communication_stats()
        product = by_neg.times(y)
        after = compat.communication_stats()
        costs.append((after["bytes"] - before["bytes"], after["rounds"] - before["rounds"]))
        out.append(product.get_plain_text())
    before = compat.communication_stats()
    crypten_own = sys_[0] * neg
    after = compat.communication_stats()
    relu = compare.relu(sx).get_plain_text()
    return (neg.get_plain_text(), out, costs, after["bytes"] - before["bytes"], relu,
            crypten_own.get_plain_text())  # fmt: skip


@pytest.mark.parametrize("parties", [2, 3])
def test_products_by_the_sign_bit_open_one_operand(parties):
    """y * [x < 0] from the comparison's own dealer pairs: the value, one round, and y's bytes
    (2 per element with 2 parties, sent and received), where CrypTen's product also opens the
    bit; relu by it too."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, generator=g) * 10
    ys = [torch.randn(4, 6, generator=g) * 100 for _ in range(2)]
    results = run_multiparty(_bit_products_party, parties=parties, args=(x, ys))
    neg, out, _, _, relu, crypten_own = results[0]
    assert torch.equal(neg, (x < 0).float())
    for y, got in zip(ys, out, strict=True):
        assert torch.allclose(got, y * (x < 0), atol=1e-4)
    assert torch.allclose(crypten_own, ys[0] * (x < 0), atol=1e-4)
    assert torch.allclose(relu, x.relu(), atol=1e-4)
    for rank, result in enumerate(results):
        for nbytes, rounds in result[2]:
            assert (nbytes, rounds) == (2 * 8 * x.numel() * (parties - 1), 1), rank
    if parties == 2:  # party 1 (party 0 also fetches CrypTen's triple from the dealer)
        assert results[1][2][0][0] * 2 == results[1][3]  # CrypTen opens y - a and bit - b
