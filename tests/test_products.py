"""Products whose backward reuses the forward's openings (products.py): the dealer's correlated
triples are what the protocol needs, every product's value and gradients equal torch's, a
backward opens one tensor per product, and anything unusual goes to CrypTen's own function."""

from __future__ import annotations

import pytest
import torch

from mpc_ft import products
from mpc_ft.multiparty import run_multiparty

# (op, shape of x, shape of y or None for a public y / square): every form the heads use
CASES = [
    ("mul", (3, 4, 5), (3, 4, 5)),
    ("mul", (2, 3, 4, 4), (2, 1, 1, 4)),  # attention scores times a per-row secret scale
    ("mul", (3, 4, 5), (5,)),  # LayerNorm's gain
    ("matmul", (3, 4, 5), (5, 6)),  # a linear layer
    ("matmul", (2, 3, 4, 5), (2, 3, 5, 4)),  # attention
    ("square", (3, 4), None),
]


def test_shapes_of_the_dealer_answer():
    s = torch.Size
    assert products.correlation_sizes("matmul", s([3, 4, 5]), s([5, 6])) == [
        s([3, 4, 6]), s([3, 4, 5]), s([5, 6])]  # fmt: skip
    assert products.correlation_sizes("mul", s([2, 1, 4]), s([3, 1])) == [
        s([2, 3, 4]), s([2, 1, 4]), s([3, 1])]  # fmt: skip
    assert products.correlation_sizes("square", s([7]), s([7])) == [s([7]), s([7])]
    t = torch.arange(24).reshape(2, 3, 4)
    assert torch.equal(products.sum_to(t, s([3, 1])), t.sum(0).sum(1, keepdim=True))


def _triples_party(rank):
    """Open every share of the correlated triples: the relations must hold in the ring."""
    import crypten
    import crypten.communicator as comm

    from mpc_ft.ops import MpcOps

    MpcOps(crypten)  # registers the provider's method (compat patch 10)
    provider = crypten.mpc.get_default_provider()
    opened = []
    for op, s0, s1 in CASES:
        s1 = s0 if s1 is None else s1
        parts = getattr(provider, products.PROVIDER_METHOD)(op, torch.Size(s0), torch.Size(s1))
        opened.append([comm.get().all_reduce(p.clone()) for p in parts])
    return opened


@pytest.mark.parametrize("parties", [2, 3])
def test_the_dealer_makes_the_correlations_the_backward_needs(parties):
    opened = run_multiparty(_triples_party, parties=parties)[0]
    for (op, s0, s1), (a, b, r, c, corr_x, corr_y) in zip(CASES, opened, strict=True):
        s1 = s0 if s1 is None else s1
        assert torch.equal(c, products._fn(op)(a, b)), op
        if op == "square":
            assert torch.equal(a, b) and torch.equal(corr_y, a * r)
            continue
        assert torch.equal(corr_x, products.sum_to(products._grad_x(op, r, b), torch.Size(s0)))
        # x op_y r, written out (_grad_y sums a broadcast matrix operand's in one product)
        grad_y = a * r if op == "mul" else a.transpose(-2, -1).matmul(r)
        assert torch.equal(corr_y, products.sum_to(grad_y, torch.Size(s1)))


def _inputs(op, s0, s1, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s0, generator=g)
    y = torch.randn(s1, generator=g) if s1 is not None else None
    grad = torch.randn(products.product_size(op, torch.Size(s0), torch.Size(s1 or s0)),
                       generator=g)  # fmt: skip
    return x, y, grad


def _product(op, x, y):
    return x.square() if op == "square" else getattr(x, op)(y)


def _gradients_party(rank, reuse, public_y):
    import crypten

    from mpc_ft import compat
    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten, triples_ahead=False, reuse_openings=reuse)
    out = []
    for i, (op, s0, s1) in enumerate(CASES):
        x, y, grad = _inputs(op, s0, s1, seed=i)
        sx = ops.leaf(crypten.cryptensor(x, src=0))
        sy = None if y is None else (y if public_y else ops.leaf(crypten.cryptensor(y, src=1)))
        z = _product(op, sx, sy)
        before = compat.communication_stats()
        z.backward(crypten.cryptensor(grad, src=0))
        after = compat.communication_stats()
        grads = [sx.grad.get_plain_text()]
        if sy is not None and not public_y:
            grads.append(sy.grad.get_plain_text())
        out.append((z.get_plain_text(), grads, after["rounds"] - before["rounds"],
                    after["bytes"] - before["bytes"]))  # fmt: skip
    return out


@pytest.mark.parametrize("parties", [2, 3])
def test_values_and_gradients_match_torch_with_one_opening_per_backward(parties):
    results = run_multiparty(_gradients_party, parties=parties, args=(True, False))[0]
    crypten_own = run_multiparty(_gradients_party, parties=2, args=(False, False))[0]
    for i, ((op, s0, s1), (z, grads, rounds, nbytes)) in enumerate(
        zip(CASES, results, strict=True)
    ):
        x, y, grad = (t.requires_grad_() if t is not None else t for t in _inputs(op, s0, s1, i))
        expected = _product(op, x, y)
        expected.backward(grad)
        assert torch.allclose(z, expected.detach(), atol=2e-3), op
        wanted = [x.grad] + ([y.grad] if y is not None else [])
        for got, want in zip(grads, wanted, strict=True):
            assert torch.allclose(got, want, atol=5e-3), (op, s0, s1)
        if parties == 2:  # one opening (f = g - r), truncation local: one round, g's size
            assert rounds == 1, (op, rounds)
            assert nbytes == 2 * 8 * grad.numel(), op
            assert nbytes < crypten_own[i][3], op  # CrypTen opens g twice, x and y again


def test_a_public_operand_is_local_both_ways():
    results = run_multiparty(_gradients_party, parties=2, args=(True, True))[0]
    for i, ((op, s0, s1), (z, grads, rounds, _)) in enumerate(zip(CASES, results, strict=True)):
        if s1 is None:
            continue
        x, y, grad = _inputs(op, s0, s1, i)
        x.requires_grad_()
        expected = _product(op, x, y)
        expected.backward(grad)
        assert torch.allclose(z, expected.detach(), atol=2e-3), op
        assert torch.allclose(grads[0], x.grad, atol=5e-3), op
        assert rounds == 0, op  # g times a public y: local, truncation local with 2 parties


def _fallback_party(rank, reuse):
    import crypten

    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten, triples_ahead=False, reuse_openings=reuse)
    x = ops.leaf(crypten.cryptensor(torch.tensor([-1.5, 2.0, -0.25, 3.0]), src=0))
    bit = x < 0  # a 0/1 sharing at scale 1: CrypTen's own mul handles the scales
    z = x * bit
    z.backward(crypten.cryptensor(torch.ones(4)))
    return z.get_plain_text(), x.grad.get_plain_text()


def test_an_operand_at_another_scale_goes_to_crypten():
    z, grad = run_multiparty(_fallback_party, parties=2, args=(True,))[0]
    assert torch.allclose(z, torch.tensor([-1.5, 0.0, -0.25, 0.0]), atol=1e-3)
    # CrypTen's own, whatever it makes of the comparison's gradient
    _, crypten_grad = run_multiparty(_fallback_party, parties=2, args=(False,))[0]
    assert torch.allclose(grad, crypten_grad, atol=1e-3)
