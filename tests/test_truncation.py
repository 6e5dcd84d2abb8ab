"""Truncation (truncation.py). Three parties (compat patch 16): right to one unit and unbiased,
party 2's share reaches party 1 only under a mask it cannot remove, party 0 neither sends nor
waits, the shared generators stay in step, and other party counts keep CrypTen's protocol.
Local division by shifts (patch 17): stochastic rounding, one unit at most, unbiased; other
divisors round toward zero as CrypTen's."""

from __future__ import annotations

import pytest
import torch

from mpc_ft import truncation
from mpc_ft.multiparty import run_multiparty

SCALE = 2**16
N = 4000


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The fixed-point integers CrypTen encodes `t` as (16 bits, rounding toward zero)."""
    return (t * SCALE).long()


def _party(rank):
    import crypten
    import crypten.communicator as comm

    from mpc_ft import compat
    from mpc_ft.ops import MpcOps

    MpcOps(crypten)
    channel = comm.get()
    received = []
    if rank == truncation.RECEIVER:  # keep what party 1 is sent (its whole view of the protocol)
        plain_recv = channel.recv

        def recv(tensor, src=None):
            out = plain_recv(tensor, src)
            received.append(out.clone())
            return out

        channel.recv = recv
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, generator=g) * 40
    y = torch.randn(N, generator=g)
    sx, sy = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
    before = compat.communication_stats()
    scaled = sx * 0.37  # one truncation
    after = compat.communication_stats()
    share2 = scaled._tensor.share.clone()  # party 2's share is now 0
    twice = scaled * 0.5  # party 2 sends 0 - s: only the mask
    product = sx * sy
    divided = sx.div(3)  # a public integer divisor
    late = crypten.cryptensor(y, src=2)  # a zero sharing from the pairwise generators
    return {
        "counted": (after["bytes"] - before["bytes"], after["rounds"] - before["rounds"]),
        "share2": share2,
        "received": received,
        "values": [t.get_plain_text() for t in (scaled, twice, product, divided, late)],
        "raw": [t._tensor.share.clone() for t in (scaled, product, sx, sy)],
    }


@pytest.fixture(scope="module")
def three():
    return run_multiparty(_party, parties=3)


def test_values_are_right_to_two_units_and_unbiased(three):
    g = torch.Generator().manual_seed(7)
    torch.randn(N, generator=g)  # x: its encoding comes from the shares below
    y = torch.randn(N, generator=g)
    scaled, twice, product, divided, late = three[0]["values"]
    scaled_raw, product_raw, x_raw, y_raw = (sum(r["raw"][i] for r in three) for i in range(4))
    raw = [scaled_raw, product_raw]  # the opened integers, and what they should be
    exact = [(x_raw * _raw(torch.tensor(0.37))).double() / SCALE,
             (x_raw * y_raw).double() / SCALE]  # fmt: skip
    for got, want in zip(raw, exact, strict=True):
        # two shares shifted, 1 added at party 0: X rounded stochastically, unbiased
        error = got.double() - want
        assert error.abs().max() <= 1
        assert abs(error.mean().item()) < 0.1
    # the decoded values, against the inputs and the constant as encoded (0.37: 24248 / 2^16)
    xe, ye, ce = x_raw.double() / SCALE, y_raw.double() / SCALE, 24248 / SCALE
    pairs = [(scaled, xe * ce), (twice, xe * ce / 2), (product, xe * ye), (divided, xe / 3)]
    for got, want in pairs:
        assert (got.double() - want).abs().max() < 4 / SCALE
    # a sharing drawn after them decodes: the generators of parties 0 and 2 stayed in step
    assert torch.equal(late, _raw(y).float() / SCALE)


def test_party_2_folds_its_share_into_party_1s_under_a_mask(three):
    assert torch.count_nonzero(three[2]["share2"]) == 0  # party 2 holds 0 after a truncation
    assert torch.count_nonzero(three[0]["share2"]) == N  # party 0's share: x0 + s, uniform
    first, second, *_ = three[truncation.RECEIVER]["received"]
    # the second message is 0 - s: a fresh uniform mask, nothing of x; its top bits are fair coins
    for message in (first, second):
        assert torch.count_nonzero(message) == N
        negative = (message < 0).float().mean().item()
        assert 0.45 < negative < 0.55
        assert message.abs().min() > 2**40  # no small values: no visible fixed-point number
    assert not torch.equal(first, second)
    assert len(three[0]["received"]) == len(three[2]["received"]) == 0


def test_only_parties_1_and_2_communicate(three):
    # party 2 sends N elements, party 1 receives them: one counted round each; party 0 nothing
    assert three[0]["counted"] == (0, 0)
    assert three[1]["counted"] == three[2]["counted"] == (8 * N, 1)


def _four_parties(rank):
    import crypten

    from mpc_ft import compat
    from mpc_ft.ops import MpcOps

    MpcOps(crypten)
    x = torch.linspace(-50, 50, 64)
    sx = crypten.cryptensor(x, src=0)
    before = compat.communication_stats()
    out = sx * 0.37
    after = compat.communication_stats()
    return out.get_plain_text(), after["rounds"] - before["rounds"]


def test_other_party_counts_keep_crypten_protocol():
    results = run_multiparty(_four_parties, parties=4)
    x = torch.linspace(-50, 50, 64)
    for value, _ in results:
        assert (value - x * (24248 / SCALE)).abs().max() < 8 / SCALE
    # CrypTen's wrap count: party 0 fetches a dealer pair (3 calls) and gathers (1)
    assert results[0][1] == 4 and results[1][1] == 1


def _ahead_party(rank):
    import crypten

    from mpc_ft.offline import TripleCache
    from mpc_ft.ops import MpcOps

    MpcOps(crypten)
    cache = TripleCache(crypten)
    x = torch.linspace(-50, 50, 64)
    values = []
    for _ in range(3):  # record, then two steps whose masks are drawn in the offline phase
        sx = crypten.cryptensor(x, src=0)
        with cache.step():
            values.append(((sx * 0.37) * 0.5 < 3).get_plain_text())
    return values, [name for name, *_ in cache.requests]


def test_masks_drawn_ahead_with_the_triples_stay_in_step():
    results = run_multiparty(_ahead_party, parties=3)
    want = (torch.linspace(-50, 50, 64) * 0.185 < 3).float()
    for values, _ in results:
        assert all(torch.equal(v, want) for v in values)
    # parties 0 and 2 traced their masks (two truncations and the comparison's fold); party 1
    # draws none
    assert results[0][1].count(truncation.PROVIDER_METHOD) == 3
    assert results[2][1].count(truncation.PROVIDER_METHOD) == 3
    assert truncation.PROVIDER_METHOD not in results[1][1]


def _two_parties(rank):
    import crypten

    from mpc_ft.ops import MpcOps

    MpcOps(crypten)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, generator=g) * 40
    sx = crypten.cryptensor(x, src=0)
    share = sx._tensor.share.clone()
    product = sx * sx  # truncated by 2^16: shifts
    third = sx.div(3)  # not a power of two: CrypTen's division toward zero
    return {
        "x": share,
        "product": product._tensor.share.clone(),
        "third": third._tensor.share.clone(),
        "divided": [truncation.divide(share, d) for d in (1, 2**16, 2.0**16, 3)],
    }


def test_two_parties_divide_by_shifts_rounding_stochastically():
    parties = run_multiparty(_two_parties, parties=2)
    x = sum(p["x"] for p in parties)
    for rank, p in enumerate(parties):  # the local rule: floor, and 1 more at party 0 (k > 0)
        one, scale, scale_float, three = p["divided"]
        assert torch.equal(one, p["x"])
        assert torch.equal(scale, (p["x"] >> 16) + (1 if rank == 0 else 0))
        assert torch.equal(scale_float, scale)
        assert torch.equal(three, p["x"].div(3, rounding_mode="trunc"))
    # the opened product against the exact one: within one unit, unbiased
    error = sum(p["product"] for p in parties).double() - (x.double() * x.double()) / SCALE
    assert error.abs().max() <= 1
    assert abs(error.mean().item()) < 0.05
    # and divided by 3 toward zero per share: within two units of x / 3
    third = sum(p["third"] for p in parties).double()
    assert (third - x.double() / 3).abs().max() < 2
