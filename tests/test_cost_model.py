"""The cost model (mpc_ft/cost_model.py) by hand on small shapes, and against CrypTen's own
per-party counters for 2 and 3 parties + the dealer (one multi-party session per party count)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from mpc_ft import cost_model as cm
from mpc_ft.config import MpcConfig
from mpc_ft.multiparty import run_multiparty

# Party 0's fixed price of one dealer call (3 counted calls): the request dict, the returned
# torch.Size (48 B + 8 B per dimension) and 8 B per element of its share.
DEALER_1D = 184 + 48 + 8  # + 8 * numel, for a 1-D tensor


# --- by hand --------------------------------------------------------------------------------------


def test_open_10_elements():
    # one opening of the 10 shares: 2 parties send and receive 10 elements each, counted as
    # 2 * 10 * 8 B; 3 parties (compat's direct exchange) send to and receive from 2 each
    assert cm.open_(10, 2) == cm.Cost(160, 1, 160, 1)
    assert cm.open_(10, 3) == cm.Cost(320, 1, 320, 1)


def test_mul_10_elements():
    # open epsilon and delta in one batched all_reduce: 2 * (10 + 10) * 8 = 320 B, 1 round.
    # 2 parties: truncation is local. Party 0 also fetches c from the dealer: 3 calls,
    # 184 + 56 + 80 B.
    assert cm.mul(10, 2) == cm.Cost(320, 1, 320 + DEALER_1D + 80, 4)
    # 3 parties: the opening counts twice (two peers); + truncation (truncation.py): party 2
    # sends 10 elements to party 1, 80 B counted by each of them in one round; party 0 none
    assert cm.mul(10, 3) == cm.Cost(640 + 80, 2, 640 + DEALER_1D + 80, 4)
    # 4 parties: CrypTen's truncation, a dealer wrap pair (party 0) and a gather of 10 elements
    # to party 0, which counts (4 - 1) * 10 * 8 = 240 B; the others count 80 B
    assert cm.mul(10, 4) == cm.Cost(960 + 80, 2, 960 + 2 * (DEALER_1D + 80) + 240, 8)


def test_matmul_2x3_by_3x4():
    # open x - a (6) and y - b (12): 2 * 18 * 8 = 288 B; c is 2x4 (2-D: 48 + 16 B for its size)
    assert cm.matmul(2, 3, 4, 2) == cm.Cost(288, 1, 288 + 184 + 64 + 64, 4)
    batched = cm.matmul(2, 3, 4, 2, batch=5)  # everything 5 times, c is 3-D
    assert (batched.bytes, batched.rounds) == (5 * 288, 1)
    assert batched.bytes0 == 5 * 288 + 184 + 72 + 5 * 64


def test_public_mul_is_free_for_two_parties_only():
    assert cm.public_mul(10, 2) == cm.Cost()
    assert cm.public_mul(10, 3) == cm.Cost(80, 1, 0, 0)  # parties 2 -> 1, party 0 idle
    assert cm.public_mul(10, 4).bytes0 == 240 + DEALER_1D + 80


def test_ltz_two_parties():
    # compare.py: 10 elements padded to 64 words: an AND of 64 words (4 counted elements each:
    # two tensors opened, sent and received), ANDs of 64, 32, ..., 2 words for the six levels,
    # then the bits back to arithmetic (packed in one word, 2 counted): (256 + 504 + 2) * 8 B in
    # 8 rounds
    assert (cm.ltz(10, 2).bytes, cm.ltz(10, 2).rounds) == (6096, 8)
    # 3 parties: first party 2's share folded into party 1's (truncation.fold: 10 elements, one
    # round; party 0 none), every opening sent to two peers
    assert (cm.ltz(10, 3).bytes, cm.ltz(10, 3).rounds) == (2 * 6096 + 80, 9)
    assert cm.ltz(10, 3).rounds0 == cm.ltz(10, 2).rounds0
    # 4 parties: two carry-save ANDs of the 10 words
    assert (cm.ltz(10, 4).bytes, cm.ltz(10, 4).rounds) == (3 * (6096 + 2 * 320), 10)


def test_cost_arithmetic():
    c = cm.Cost(1, 2, 3, 4)
    assert c + c == 2 * c == c * 2 == cm.Cost(2, 4, 6, 8)
    assert c.party(0) == (3, 4) and c.party(2) == (1, 2)


class _Secret:
    """Stands in for a CrypTensor: records each product as secret * secret or * public."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __mul__(self, other: object) -> _Secret:
        self.log.append("secret" if isinstance(other, _Secret) else "public")
        return _Secret(self.log)

    def __add__(self, other: object) -> _Secret:
        return _Secret(self.log)

    __radd__ = __rsub__ = __add__


@pytest.mark.parametrize(("lo", "hi"), [(1, 2), (1, 5), (1, 32), (1, 512), (0.5, 0.5001)])
def test_reciprocal_steps_is_the_formula_of_ops(lo, hi):
    # ops.reciprocal_in_range takes its step count from cm.reciprocal_steps: run it on a
    # stand-in that records its products (first step: x * public) to check the cost it models
    from mpc_ft.ops import reciprocal_in_range

    log: list[str] = []
    reciprocal_in_range(_Secret(log), lo, hi)
    assert log == ["public"] + ["secret"] * 2 * (cm.reciprocal_steps(lo, hi) - 1)


def test_reciprocal_in_range_by_hand():
    # [1, 2]: the best line's error is 1/17 and squares each step: (1/17)^4 = 1.2e-5 < 2^-16
    # after 2 Newton steps; [1, 32]: 961/1217 = 0.79, 0.79^64 < 2^-16 after 6
    assert (cm.reciprocal_steps(1, 2), cm.reciprocal_steps(1, 32)) == (3, 7)
    assert cm.reciprocal_start(1, 2)[2] == pytest.approx(1 / 17)
    # 2 parties: the public start is free, then 2 products (1 round each) per step
    assert cm.reciprocal_in_range(10, 2, 1, 2) == 4 * cm.mul(10, 2)
    # 3 parties: + a round per truncation (party 0: + a dealer call per product too)
    assert cm.reciprocal_in_range(10, 3, 1, 32).rounds == 1 + 12 * 2


@pytest.mark.parametrize(("lo", "hi"), [(1, 2), (1, 3), (1, 32), (1, 256), (1 / 32, 32)])
def test_reciprocal_in_range_reaches_its_tolerance(lo, hi):
    # the start line and the step count, in float64: the whole range within the tolerance, and
    # the line is the best one (its error equioscillates: +e0 at both ends, -e0 in the middle)
    from mpc_ft.ops import reciprocal_in_range

    x = torch.linspace(lo, hi, 100_001, dtype=torch.float64)
    assert (1 - x * reciprocal_in_range(x, lo, hi)).abs().max() <= cm.RECIPROCAL_TOL
    alpha, beta, e0 = cm.reciprocal_start(lo, hi)
    error = 1 - x * (alpha - beta * x)
    assert error.max() == pytest.approx(e0) and error.min() == pytest.approx(-e0, rel=1e-3)


def test_reciprocal_in_range_refuses_a_range_its_start_cannot_resolve():
    from types import SimpleNamespace

    from mpc_ft.ops import reciprocal_in_range

    shared = SimpleNamespace(encoder=SimpleNamespace(_precision_bits=16))
    with pytest.raises(ValueError, match="too wide"):
        reciprocal_in_range(shared, 1.0, 512.0)


def test_row_max_by_hand():
    # [3, 5]: 2 pairs per row, then 3 columns (1 pair + the odd one), then 2 (1 pair)
    for parties in (2, 3):
        want = cm.bit_relu(6, parties, ndim=2) + 2 * cm.bit_relu(3, parties, ndim=2)
        assert cm.row_max(3, 5, parties) == want
    assert cm.row_max(3, 5, 2).rounds == 3 * (8 + 1)  # a relu: ltz (8) + the 0/1 product
    assert cm.row_max(3, 1, 2) == cm.Cost()


@pytest.mark.parametrize("parties", [2, 3])
def test_composites_contain_their_parts(parties):
    def ge(a, b):
        return a.bytes >= b.bytes and a.rounds >= b.rounds and a.bytes0 >= b.bytes0

    def lt(a, b):
        return a.bytes < b.bytes and a.rounds < b.rounds and a.bytes0 < b.bytes0

    p = parties
    assert ge(cm.layer_norm(8, 16, p), cm.inv_sqrt(8, p))
    assert ge(cm.layer_norm(8, 16, p), cm.square(128, p))
    assert ge(cm.inv_sqrt(10, p), cm.exp(10, p))
    assert ge(cm.sqrt(10, p), cm.inv_sqrt(10, p))
    assert ge(cm.reciprocal(10, p), cm.reciprocal(10, p, all_pos=True))
    assert ge(cm.reciprocal(10, p, all_pos=True), cm.exp(10, p))
    assert ge(cm.tanh(10, p), cm.ltz(10, p)) and ge(cm.relu(10, p), cm.ltz(10, p))
    assert ge(cm.gelu(10, p), cm.ltz(10, p) + cm.exp(10, p)) and ge(cm.tanh(10, p), cm.gelu(10, p))
    assert ge(cm.masked_softmax(6, 5, p), cm.row_max(6, 5, p) + cm.exp(30, p, ndim=2)
              + cm.reciprocal_in_range(6, p, 1, 5, ndim=2))  # fmt: skip
    assert ge(cm.cross_entropy(4, 3, p), cm.row_max(4, 3, p) + cm.log(4, p, ndim=2))
    assert ge(cm.cross_entropy_backward(4, 3, p), cm.row_max(4, 3, p)
              + cm.reciprocal_in_range(4, p, 1, 3, ndim=2))  # fmt: skip
    assert cm.masked_mean(2, 3, 4, p, inv_count=False) == (
        cm.masked_mean(2, 3, 4, p) + cm.inverse_count(2, 3, p)
    )
    assert cm.inverse_count(2, 3, p) == cm.reciprocal_in_range(2, p, 1, 3, ndim=2)
    assert ge(cm.quad_attention(2, 2, 3, p), cm.square(36, p, ndim=4))
    assert cm.linear(6, 3, 5, p) == cm.matmul(6, 3, 5, p)
    assert cm.max_(6, 5, p) == cm.argmax(6, 5, p)
    # exp: 8 squarings, one opening each; 3 parties: + a gather per truncation and for x / 256
    assert cm.exp(10, p).rounds == (8 if p == 2 else 1 + 8 * 2)
    # the MPC-native head's replacements are cheaper, the row max by relu tree than CrypTen's
    assert lt(cm.quad_attention(2, 2, 3, p), cm.masked_softmax(12, 3, p, mask_rows=2, ndim=4))
    assert lt(cm.quad_activation(10, p), cm.gelu(10, p))
    assert lt(cm.center(8, 16, p), cm.layer_norm(8, 16, p))
    assert lt(cm.row_max(6, 5, p), cm.max_(6, 5, p))
    # more parties never cost less
    assert ge(cm.layer_norm(8, 16, 3), cm.layer_norm(8, 16, 2))


@pytest.mark.parametrize("parties", [2, 4])
def test_more_dimensions_cost_party0_8_bytes_per_dealer_call(parties):
    # party 0's extra rounds are its dealer calls, 3 each (not with 3 parties, where party 0
    # also skips the truncations' rounds); each returns a torch.Size 8 B longer,
    # but for the 8 calls of every comparison's carry tree and bit conversion (compare.py works
    # on flattened words)
    p = parties
    pairs = [(cm.linear(6, 4, 5, p), cm.linear(6, 4, 5, p, ndim=3), 0),
             (cm.matmul(3, 2, 3, p, batch=4), cm.matmul(3, 2, 3, p, batch=4, ndim=4), 0),
             (cm.layer_norm(6, 6, p), cm.layer_norm(6, 6, p, ndim=3), 0),
             (cm.center(6, 6, p), cm.center(6, 6, p, ndim=3), 0),
             (cm.gelu(12, p, ndim=2), cm.gelu(12, p, ndim=3), 1),
             (cm.quad_activation(12, p, ndim=2), cm.quad_activation(12, p, ndim=3), 0),
             (cm.masked_softmax(12, 3, p, mask_rows=2, ndim=3),
              cm.masked_softmax(12, 3, p, mask_rows=2, ndim=4), 2)]  # fmt: skip
    for low, high, comparisons in pairs:
        assert (high.bytes, high.rounds, high.rounds0) == (low.bytes, low.rounds, low.rounds0)
        dealer_calls = (low.rounds0 - low.rounds) // 3 - 8 * comparisons
        assert dealer_calls > 0 and high.bytes0 - low.bytes0 == 8 * dealer_calls


# --- against CrypTen ------------------------------------------------------------------------------


def _rand(shape, lo, hi, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo


def _measure(rank: int, names: list[str]) -> dict[str, tuple[float, int]]:
    """On every party: CrypTen's own counters around each op alone, {name: (bytes, rounds)}."""
    import crypten

    from mpc_ft import compat
    from mpc_ft.ops import MpcOps, log_in_range, reciprocal_in_range, row_max

    def enc(shape, lo=-2.0, hi=2.0, seed=0):
        return crypten.cryptensor(_rand(shape, lo, hi, seed), src=seed % 2)

    ops = MpcOps(crypten)
    x, y, pos = enc(10), enc(10, seed=1), enc(10, 0.5, 4.0, seed=2)
    mask = (_rand((2, 3), 0, 1, 3) > 0.3).float().index_fill(1, torch.tensor(0), 1)
    key_mask = crypten.cryptensor(mask.reshape(2, 1, 1, 3))
    inv_count = crypten.cryptensor(1.0 / mask.sum(1, keepdim=True))
    onehot = crypten.cryptensor(torch.eye(4)[[0, 2, 1]])
    onehot2 = crypten.cryptensor(torch.eye(2)[[0, 1, 1]])
    cases = {  # name: (op, its shared inputs)
        "share": (lambda t: t, [enc((4, 5))]),  # sharing an input: PRZS, no communication
        "open": (lambda t: t.get_plain_text(), [x]),
        "mul": (lambda t, u: t * u, [x, y]),
        "matmul": (lambda t, u: t.matmul(u), [enc((2, 3)), enc((3, 4), seed=1)]),
        "matmul_batched": (lambda t, u: t.matmul(u), [enc((5, 2, 3)), enc((5, 3, 4), seed=1)]),
        "public_mul": (lambda t: t * 0.5, [x]),
        "square": (lambda t: t.square(), [x]),
        "ltz": (lambda t: t < 0, [x]),
        "relu": (lambda t: t.relu(), [x]),
        "exp": (lambda t: t.exp(), [x]),
        "reciprocal": (lambda t: t.reciprocal(), [pos]),
        "reciprocal_all_pos": (lambda t: t.reciprocal(), [pos]),  # under all_positive()
        "inv_sqrt": (lambda t: t.inv_sqrt(), [pos]),
        "sqrt": (lambda t: t.sqrt(), [pos]),
        "log": (lambda t: t.log(), [pos]),
        "sigmoid": (lambda t: t.sigmoid(), [x]),
        "tanh": (lambda t: t.tanh(), [x]),
        "max": (lambda t: t.max(-1, keepdim=True), [enc((3, 5), -3, 3)]),
        "argmax": (lambda t: t.argmax(dim=-1, one_hot=True), [enc((3, 5), -3, 3)]),
        "row_max": (row_max, [enc((3, 5), -3, 3)]),  # odd widths: 5 -> 3 -> 2 -> 1
        "reciprocal_in_range": (lambda t: reciprocal_in_range(t, 1.0, 5.0),
                                [enc((4, 1), 1, 5)]),
        "log_in_range": (lambda t: log_in_range(t, 1.0, 2.0), [enc((4, 1), 1, 2)]),
        "log_in_range_halved": (lambda t: log_in_range(t, 1.0, 10.0), [enc((4, 1), 1, 10)]),
        "linear": (ops.linear, [enc((6, 3)), enc((3, 5), seed=1), enc(5, seed=3)]),
        "layer_norm": (lambda *a: ops.layer_norm(*a, 1e-5),
                       [enc((4, 6)), enc(6, 0.5, 1.5), enc(6, seed=1)]),
        "center": (lambda *a: ops.center(*a, 1e-5), [enc((4, 6)), enc(6, 0.5, 1.5), enc(6)]),
        "gelu": (ops.gelu, [x]),
        "quad_activation": (ops.quad_activation, [x]),
        "masked_softmax": (ops.masked_softmax, [enc((4, 5), -3, 3), enc((1, 5), 1, 1)]),
        "masked_mean": (ops.masked_mean, [enc((2, 3, 4)), crypten.cryptensor(mask), inv_count]),
        "masked_mean_count": (ops.masked_mean, [enc((2, 3, 4)), crypten.cryptensor(mask)]),
        "cross_entropy": (ops.cross_entropy, [enc((3, 4), -3, 3), onehot]),
        # on logits that do not require grad: the backward it starts does nothing
        "cross_entropy_backward": (ops.cross_entropy_backward, [enc((3, 4), -3, 3), onehot]),
        # two classes: the sign and the exp side by side (ops.two_class_parts)
        "cross_entropy_2": (ops.cross_entropy, [enc((3, 2), -3, 3), onehot2]),
        "cross_entropy_backward_2": (ops.cross_entropy_backward, [enc((3, 2), -3, 3), onehot2]),
        # the head's shapes: more dimensions (party 0's dealer calls return longer sizes)
        "head_linear": (ops.linear, [enc((2, 3, 4)), enc((4, 5), seed=1), enc(5, seed=3)]),
        "head_matmul": (lambda t, u: t.matmul(u), [enc((2, 2, 3, 2)), enc((2, 2, 2, 3), seed=1)]),
        "head_softmax": (ops.masked_softmax, [enc((2, 2, 3, 3), -3, 3), key_mask]),
        "head_quad_attention": (ops.quad_attention, [enc((2, 2, 3, 3)), key_mask, inv_count]),
        "head_layer_norm": (lambda *a: ops.layer_norm(*a, 1e-5),
                            [enc((2, 3, 6)), enc(6, 0.5, 1.5), enc(6, seed=1)]),
        "head_center": (lambda *a: ops.center(*a, 1e-5),
                        [enc((2, 3, 6)), enc(6, 0.5, 1.5), enc(6)]),
        "head_gelu": (ops.gelu, [enc((2, 3, 2))]),
        "head_quad_activation": (ops.quad_activation, [enc((2, 3, 2))]),
    }  # fmt: skip
    measured = {}
    for name in names:
        op, args = cases[name]
        positive = compat.all_positive() if name == "reciprocal_all_pos" else nullcontext()
        with crypten.no_grad(), positive:
            compat.reset_communication_stats()
            op(*args)
            stats = compat.communication_stats()
        measured[name] = (stats["bytes"], stats["rounds"])
    return measured


def model(parties: int, precision_bits: int) -> dict[str, cm.Cost]:
    """The cost model for each case of `_measure`, same shapes."""
    p = parties
    return {
        "share": cm.Cost(),
        "open": cm.open_(10, p),
        "mul": cm.mul(10, p),
        "matmul": cm.matmul(2, 3, 4, p),
        "matmul_batched": cm.matmul(2, 3, 4, p, batch=5),
        "public_mul": cm.public_mul(10, p),
        "square": cm.square(10, p),
        "ltz": cm.ltz(10, p),
        "relu": cm.relu(10, p),
        "exp": cm.exp(10, p),
        "reciprocal": cm.reciprocal(10, p),
        "reciprocal_all_pos": cm.reciprocal(10, p, all_pos=True),
        "inv_sqrt": cm.inv_sqrt(10, p),
        "sqrt": cm.sqrt(10, p),
        "log": cm.log(10, p),
        "sigmoid": cm.sigmoid(10, p),
        "tanh": cm.tanh(10, p),
        "max": cm.max_(3, 5, p, precision_bits=precision_bits),
        "argmax": cm.argmax(3, 5, p, precision_bits=precision_bits),
        "row_max": cm.row_max(3, 5, p),
        "reciprocal_in_range": cm.reciprocal_in_range(4, p, 1.0, 5.0, ndim=2),
        "log_in_range": cm.log_in_range(4, p, 1.0, 2.0, ndim=2),
        "log_in_range_halved": cm.log_in_range(4, p, 1.0, 10.0, ndim=2),
        "linear": cm.linear(6, 3, 5, p),
        "layer_norm": cm.layer_norm(4, 6, p),
        "center": cm.center(4, 6, p),
        "gelu": cm.gelu(10, p),
        "quad_activation": cm.quad_activation(10, p),
        "masked_softmax": cm.masked_softmax(4, 5, p, mask_rows=1),
        "masked_mean": cm.masked_mean(2, 3, 4, p),
        "masked_mean_count": cm.masked_mean(2, 3, 4, p, inv_count=False),
        "cross_entropy": cm.cross_entropy(3, 4, p),
        "cross_entropy_backward": cm.cross_entropy_backward(3, 4, p),
        "cross_entropy_2": cm.cross_entropy(3, 2, p),
        "cross_entropy_backward_2": cm.cross_entropy_backward(3, 2, p),
        "head_linear": cm.linear(6, 4, 5, p, ndim=3),
        "head_matmul": cm.matmul(3, 2, 3, p, batch=4, ndim=4),
        "head_softmax": cm.masked_softmax(12, 3, p, mask_rows=2, ndim=4),
        "head_quad_attention": cm.quad_attention(2, 2, 3, p),
        "head_layer_norm": cm.layer_norm(6, 6, p, ndim=3),
        "head_center": cm.center(6, 6, p, ndim=3),
        "head_gelu": cm.gelu(12, p, ndim=3),
        "head_quad_activation": cm.quad_activation(12, p, ndim=3),
    }


# 2 parties: every case. 3 parties (4 processes on this machine's cores, ~2x slower per op): the
# ops whose protocol changes with 3 parties (truncation by wrap count, the A2B adder tree) and
# every component of mpc_ft/ops.py.
SESSIONS = {
    2: list(model(2, 16)),
    3: ["share", "open", "mul", "matmul", "matmul_batched", "public_mul", "square", "ltz",
        "exp", "inv_sqrt", "max", "row_max", "reciprocal_in_range", "log_in_range",
        "log_in_range_halved", "layer_norm", "center",
        "quad_activation", "masked_softmax", "masked_mean", "masked_mean_count", "cross_entropy",
        "cross_entropy_backward", "cross_entropy_2", "cross_entropy_backward_2", "head_linear",
        "head_matmul", "head_softmax", "head_quad_attention", "head_layer_norm", "head_center",
        "head_gelu", "head_quad_activation"],
}  # fmt: skip


@pytest.fixture(scope="module")
def measured() -> dict[int, list[dict[str, tuple[float, int]]]]:
    return {p: run_multiparty(_measure, parties=p, args=(names,)) for p, names in SESSIONS.items()}


CASES = [(p, name) for p, names in SESSIONS.items() for name in names]


@pytest.mark.parametrize(("parties", "name"), CASES, ids=[f"{p}p-{n}" for p, n in CASES])
def test_model_against_crypten(measured, parties, name):
    # exact: measured / model == 1 for bytes and rounds, on every party
    want = model(parties, MpcConfig.precision_bits)[name]
    for rank, per_party in enumerate(measured[parties]):
        assert per_party[name] == want.party(rank), rank


def test_party0_alone_pays_the_dealer(measured):
    # one mul among 2 parties: party 0 also fetches c (3 calls, 184 + 56 + 80 B)
    party0, party1 = (measured[2][r]["mul"] for r in (0, 1))
    assert (party0[0] - party1[0], party0[1] - party1[1]) == (DEALER_1D + 80, 3)
    # the head's 4-D softmax: party 1 counts what the same sizes in 2-D cost; party 0 8 B more
    # for each of the 2 extra dimensions of every torch.Size the dealer sends it, but for the
    # 8 flat calls of each of the row max's 2 comparisons (compare.py)
    flat = cm.masked_softmax(12, 3, 2, mask_rows=2)
    dealer_calls = (flat.rounds0 - flat.rounds) // 3 - 8 * 2
    assert measured[2][1]["head_softmax"] == flat.party(1)
    assert measured[2][0]["head_softmax"] == (flat.bytes0 + 8 * 2 * dealer_calls, flat.rounds0)
