"""The sign by a carry-only adder on packed bits (compare.py): bit tricks in plaintext, then
x < 0 on shares for 2 and 3 parties against torch, with its cost against CrypTen's."""

from __future__ import annotations

import pytest
import torch

from mpc_ft import compare
from mpc_ft import cost_model as cm
from mpc_ft.multiparty import run_multiparty


def test_masks_and_order():
    assert compare._lo_mask(1) == 0x5555555555555555
    assert compare._lo_mask(32) == 0xFFFFFFFF
    assert compare._lo_mask(2) == 0x3333333333333333
    assert compare._bit_reverse(1) == 32 and compare._bit_reverse(6) == 24
    assert sorted(compare.ORDER.tolist()) == list(range(64))


def test_carry_sign_on_plain_words(monkeypatch):
    """One party's view with the AND in the clear: the top bit of a + b mod 2^64, for random
    words, carries that run the whole width, and sizes that are no multiple of 64."""
    monkeypatch.setattr(compare, "_and", lambda x, y: x & y)
    g = torch.Generator().manual_seed(0)
    for n in (1, 63, 64, 130):
        a = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
        b = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
        a[0], b[0] = -1, 1  # 0: a carry through all 64 bits
        if n > 1:
            a[1], b[1] = 2**62, 2**62  # overflow into the sign
        want = ((a + b) < 0).long()
        assert torch.equal(compare.carry_sign(a, b), want), n


def test_pack_and_unpack_bits():
    g = torch.Generator().manual_seed(2)
    for n in (1, 63, 64, 65, 200):
        bits = torch.randint(0, 2, (n,), generator=g)
        bits[-1] = 1  # the top bit of a word (n = 64) is the sign of an int64
        words = compare.pack(bits)
        assert words.numel() == -(-n // 64)
        assert torch.equal(compare.unpack(words, n), bits), n
    assert compare.pack(torch.ones(64, dtype=torch.long)).item() == -1


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
