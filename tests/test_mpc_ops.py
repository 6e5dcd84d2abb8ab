"""Each head component under 2-party MPC (with the dealer) against torch autograd, and the CrypTen
traps from shared/CRYPTEN_NOTES.md that the components are written around.

All cases run in ONE multi-party session (spawning parties costs seconds); each test then checks
its own entry of the results.
"""

from __future__ import annotations

import pytest
import torch

from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import MpcOps, TorchOps, exp_nonpositive, log_in_range, reciprocal_in_range, row_max

B, H, T, D = 4, 2, 8, 16
_g = torch.Generator().manual_seed(3)
ROW_MAX = [torch.randn(shape, generator=_g) * 5 for shape in [(3, 5), (2, 7), (4, 1), (2, 2, 32)]]
ROW_MAX.append(torch.tensor([[1.0, 1.0, -3.0], [-2.0, -2.0, -2.0]]))  # ties
RECIPROCAL = {(1.0, 2.0): torch.linspace(1, 2, 11), (1.0, 32.0): torch.linspace(1, 32, 32),
              (1.0, 256.0): torch.linspace(1, 256, 64)}  # fmt: skip
EXP = torch.linspace(-3, 0, 1000)
LOG = {(1.0, 2.0): torch.linspace(1, 2, 1000), (1.0, 10.0): torch.linspace(1, 10, 1000)}
# Near-even two-class logits, as early in training (the reference head's loss is 0.68 there).
NEAR_EVEN = (torch.rand(512, 2, generator=_g) * 0.6, torch.eye(2)[torch.arange(512) % 2])


def _inputs() -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    return {
        "linear": (torch.randn(B, T, D, generator=g), torch.randn(D, 6, generator=g) * 0.3,
                   torch.randn(6, generator=g)),
        "layer_norm": (torch.randn(B, T, D, generator=g) * 2 + 0.5,
                       torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)),
        "gelu": (torch.linspace(-8, 8, 64).reshape(4, 16),),
        "masked_softmax": (torch.randn(B, H, T, T, generator=g) * 2, mask.reshape(B, 1, 1, T)),
        "masked_mean": (torch.randn(B, T, D, generator=g), mask),
        "cross_entropy": (torch.randn(B, 3, generator=g) * 2, onehot),
        "matmul_4d": (torch.randn(B, H, T, D, generator=g), torch.randn(B, H, D, T, generator=g)),
        # the MPC-native head's components
        "quad_attention": (torch.randn(B, H, T, T, generator=g), mask.reshape(B, 1, 1, T)),
        "quad_activation": (torch.linspace(-6, 6, 64).reshape(4, 16),),
        "center": (torch.randn(B, T, D, generator=g) * 2 + 0.5,
                   torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)),
    }  # fmt: skip


# Which inputs are differentiable (the rest, masks and labels, are data).
DIFFERENTIABLE = {"masked_softmax": (0,), "masked_mean": (0,), "cross_entropy": (0,),
                  "quad_attention": (0,)}  # fmt: skip
EXTRA = {"layer_norm": (1e-5,), "center": (1e-5,)}


def _apply(ops, name, args):
    if name == "matmul_4d":
        return args[0].matmul(args[1])
    return getattr(ops, name)(*args, *EXTRA.get(name, ()))


def _upstream(out_shape) -> torch.Tensor:
    return torch.randn(out_shape, generator=torch.Generator().manual_seed(1))


def _party(rank: int, inputs: dict) -> dict:
    import crypten

    ops = MpcOps(crypten)
    results = {}
    for name, args in inputs.items():
        diff = DIFFERENTIABLE.get(name, range(len(args)))
        shared = []
        for i, a in enumerate(args):
            s = crypten.cryptensor(a, src=i % 2)
            if i in diff:
                s = ops.leaf(s)
            shared.append(s)
        out = _apply(ops, name, shared)
        if out.dim() == 0:
            out.backward()
        else:
            (out * crypten.cryptensor(_upstream(out.size()))).sum().backward()
        results[name] = (
            out.get_plain_text(),
            [shared[i].grad.get_plain_text() for i in diff],
        )
    results["traps"] = _traps(crypten)
    results["normalize_by_variance"] = ops.normalize(crypten.cryptensor(NORMALIZE_ROWS), 1e-5)
    results["normalize_by_variance"] = results["normalize_by_variance"].get_plain_text()
    results["masked_mean_backward"] = _masked_mean_backward(crypten, ops, *inputs["masked_mean"])
    results["row_max"] = [row_max(crypten.cryptensor(x)).get_plain_text() for x in ROW_MAX]
    results["reciprocal_in_range"] = {
        bounds: reciprocal_in_range(crypten.cryptensor(x), *bounds).get_plain_text()
        for bounds, x in RECIPROCAL.items()
    }
    results["log"] = {
        bounds: (log_in_range(crypten.cryptensor(x), *bounds).get_plain_text(),
                 crypten.cryptensor(x).log().get_plain_text())
        for bounds, x in LOG.items()
    }  # fmt: skip
    results["exp"] = [f(crypten.cryptensor(EXP)).get_plain_text()
                      for f in (exp_nonpositive, lambda t: t.exp())]  # fmt: skip
    results["near_even_loss"] = ops.cross_entropy(
        *(crypten.cryptensor(t) for t in NEAR_EVEN)).get_plain_text()  # fmt: skip
    logits_in, onehot = _inputs()["cross_entropy"]
    logits = ops.leaf(crypten.cryptensor(logits_in))
    offset, total = ops.cross_entropy_backward(logits, crypten.cryptensor(onehot))
    loss = ops.loss_sum([offset], [total], onehot.size(-1)).get_plain_text() / logits_in.size(0)
    results["cross_entropy_backward"] = (loss, logits.grad.get_plain_text())
    return results


def _masked_mean_backward(crypten, ops, h, mask) -> tuple[int, int]:
    """Rounds and bytes of masked_mean's backward with the head's inputs (inv_count given)."""
    from mpc_ft import compat

    h = ops.leaf(crypten.cryptensor(h, src=0))
    inv_count = crypten.cryptensor(1.0 / mask.sum(1, keepdim=True), src=0)
    out = ops.masked_mean(h, crypten.cryptensor(mask, src=0), inv_count)
    before = compat.communication_stats()
    out.backward(crypten.cryptensor(_upstream(out.size())))
    after = compat.communication_stats()
    return after["rounds"] - before["rounds"], after["bytes"] - before["bytes"]


VARIANCES = torch.tensor([0.003, 0.0044, 0.01, 0.05, 0.2, 1.0, 4.0, 50.0])
NORMALIZE_ROWS = torch.randn(len(VARIANCES), 64, generator=torch.Generator().manual_seed(7))
NORMALIZE_ROWS = (
    (NORMALIZE_ROWS - NORMALIZE_ROWS.mean(-1, keepdim=True))
    / NORMALIZE_ROWS.std(-1, unbiased=False, keepdim=True)
    * VARIANCES.sqrt().unsqueeze(-1)
)


def _traps(crypten) -> dict:
    """The CrypTen facts the components avoid; if CrypTen changes, these tell us."""
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    found = {}
    s = crypten.cryptensor(x, requires_grad=True)
    s[:, :2].sum().backward()
    found["indexing_drops_grad"] = s.grad is None or s.grad.get_plain_text().abs().sum() == 0
    s = crypten.cryptensor(x, requires_grad=True)
    s.narrow(1, 0, 2).sum().backward()
    found["narrow_keeps_grad"] = s.grad.get_plain_text().tolist()
    s = crypten.cryptensor(x, requires_grad=True)
    copy = s.detach()  # autograd on: a clone inside the graph (ops.leaf detaches under no_grad)
    copy.requires_grad = True
    (copy * 2).sum().backward()
    found["detach_copy_gets_no_grad"] = copy.grad is None
    found["var_biased"] = crypten.cryptensor(x).var(unbiased=False).get_plain_text().item()
    found["exp_below_minus_512"] = crypten.cryptensor(torch.tensor([-600.0])).exp().get_plain_text()
    s = crypten.cryptensor(torch.tensor([4.0]), requires_grad=True)
    try:
        s.inv_sqrt().sum().backward()
        found["inv_sqrt_grad"] = None if s.grad is None else s.grad.get_plain_text().item()
    except Exception as e:  # noqa: BLE001 - any failure means "no autograd"
        found["inv_sqrt_grad"] = type(e).__name__
    for name, attempt in {"power_of_two": lambda c: c**2, "torch_plus": lambda c: x + c}.items():
        try:
            attempt(crypten.cryptensor(x))
            found[name] = "works"
        except Exception as e:  # noqa: BLE001 - which error is the fact
            found[name] = type(e).__name__
    return found


@pytest.fixture(scope="module")
def mpc_results():
    return run_multiparty(_party, parties=2, args=(_inputs(),), timeout_s=240)[0]


def _reference(name, args):
    diff = DIFFERENTIABLE.get(name, range(len(args)))
    leaves = [a.clone().requires_grad_(i in diff) for i, a in enumerate(args)]
    out = _apply(TorchOps, name, leaves)
    if out.dim() == 0:
        out.backward()
    else:
        (out * _upstream(out.shape)).sum().backward()
    return out.detach(), [leaves[i].grad for i in diff]


# Tolerances: 2 parties at 16 fractional bits (1.5e-5 resolution); exp/reciprocal/inv_sqrt/tanh
# are iterative approximations, measured here at a few 1e-3.
TOLERANCE = {
    "linear": 2e-3, "matmul_4d": 2e-3, "masked_mean": 2e-3, "layer_norm": 1e-2,
    "gelu": 3e-3, "masked_softmax": 1e-2, "cross_entropy": 1e-2,
    "quad_attention": 2e-3, "quad_activation": 2e-3, "center": 2e-3,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_component_forward_and_gradient(mpc_results, name):
    out, grads = mpc_results[name]
    ref_out, ref_grads = _reference(name, _inputs()[name])
    tol = TOLERANCE[name]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g, ref in zip(grads, ref_grads, strict=True):
        scale = ref.abs().max().item()
        assert (g - ref).abs().max().item() <= tol * max(1.0, scale), name


def test_masked_mean_backward_opens_only_the_pooled_gradient(mpc_results):
    """Pooling as one [B,1,T] @ [B,T,D] product: its backward opens g - r of the [B,D]
    gradient once (h * mask opened a [B,T,D] one)."""
    rounds, nbytes = mpc_results["masked_mean_backward"]
    assert (rounds, nbytes) == (1, 2 * 8 * B * D)


def test_masked_softmax_gives_padding_zero_weight(mpc_results):
    out, _ = mpc_results["masked_softmax"]
    assert out[0, :, :, 5:].abs().max() < 1e-3
    torch.testing.assert_close(out.sum(-1), torch.ones(B, H, T), atol=1e-2, rtol=0)


def test_normalize_is_right_for_row_variances_from_0_003_to_50(mpc_results):
    """The first LayerNorm of the default head on Rotten Tomatoes sees row variances from 0.0044;
    CrypTen's inv_sqrt with its 3 Newton steps was 57% low there (cost_model.NORM_SQRT_ITERS)."""
    got = mpc_results["normalize_by_variance"]
    # relative: var 0.003 is ~200 units at 16 bits, so r itself is only right to ~0.3%
    torch.testing.assert_close(got, TorchOps.normalize(NORMALIZE_ROWS, 1e-5), atol=2e-3, rtol=1e-2)


def test_crypten_traps_still_exist(mpc_results):
    traps = mpc_results["traps"]
    assert traps["indexing_drops_grad"], "x[idx] now keeps gradients: revisit ops.py"
    assert traps["narrow_keeps_grad"][0] == pytest.approx([1, 1, 0, 0], abs=1e-3)
    # var(unbiased=False) divides by N-1 (inverted flag): centred sum of squares 12.6875 / 3
    assert traps["detach_copy_gets_no_grad"], "detach() no longer clones through autograd"
    assert traps["var_biased"] == pytest.approx(12.6875 / 3, abs=1e-2)
    assert traps["exp_below_minus_512"].abs().item() > 1.0, "exp below -512 is no longer garbage"
    print("inv_sqrt backward:", traps["inv_sqrt_grad"])
    assert not isinstance(traps["inv_sqrt_grad"], float), "inv_sqrt now has autograd"
    assert traps["power_of_two"] == "TypeError", "x ** 2 works now: .square() is still cheaper"
    assert traps["torch_plus"] == "NotImplementedError", "torch + CrypTensor works now"


def test_row_max_tree_matches_torch_on_odd_sizes_and_ties(mpc_results):
    for got, x in zip(mpc_results["row_max"], ROW_MAX, strict=True):
        torch.testing.assert_close(got, x.max(-1, keepdim=True).values, atol=1e-3, rtol=0)


def test_reciprocal_in_range_across_its_whole_range(mpc_results):
    for bounds, x in RECIPROCAL.items():
        got = mpc_results["reciprocal_in_range"][bounds]
        # within 4 units of the 16-bit fixed point (1/x itself is resolved to one unit); [1, 256]
        # needs ops.times_small: its start's slope, 1.2e-4, encoded at 16 bits is 2.5% off
        torch.testing.assert_close(got, 1 / x, atol=4 / 2**16, rtol=0)


def test_log_in_range_is_unbiased_where_cryptens_log_reads_low(mpc_results):
    # The loss's log: CrypTen's alone reads (log x)^2 / 512 low (its exp's limit form) with a
    # spread of 2e-3 (its exp's 8 squarings); the MPC loss of the reference head was 1e-3
    # below the twin's for that reason alone (README, Precision).
    for bounds, x in LOG.items():
        ours, cryptens = (got - x.log() for got in mpc_results["log"][bounds])
        assert cryptens.mean() < -5e-4, bounds  # the bias this corrects; if not, revisit
        assert abs(ours.mean().item()) < 5e-5 and ours.abs().max() < 5e-4, bounds


def test_exp_nonpositive_is_cryptens_exp_with_16x_less_noise(mpc_results):
    # the same limit form (1 + z/256)^256; its base's rounding, times 256, was 1.9e-3 rms
    limit = (1 + EXP.double() / 256) ** 256
    ours, cryptens = (((got - limit) / limit).square().mean().sqrt().item()
                      for got in mpc_results["exp"])  # fmt: skip
    assert ours < 3e-4 and cryptens > 1e-3, (ours, cryptens)


def test_mpc_loss_is_not_biased_low(mpc_results):
    # 512 rows average the noise away (to ~5e-5); CrypTen's log read this loss 1e-3 low
    got = mpc_results["near_even_loss"].item()
    assert abs(got - TorchOps.cross_entropy(*NEAR_EVEN).item()) < 2e-4


def test_cross_entropy_backward_gives_the_loss_and_gradient_of_cross_entropy(mpc_results):
    loss, grad = mpc_results["cross_entropy_backward"]
    logits, onehot = (t.clone() for t in _inputs()["cross_entropy"])
    logits.requires_grad_(True)
    ref = TorchOps.cross_entropy(logits, onehot)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 5e-3
    # the gradient of the summed loss (sgd_step takes the mean)
    torch.testing.assert_close(grad, logits.grad * logits.size(0), atol=5e-3, rtol=0)


def test_plaintext_cross_entropy_backward_is_exactly_torchs_summed_loss():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(6, 4, generator=g) * 3).requires_grad_(True)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 4, (6,), generator=g), 4).float()
    terms = TorchOps.cross_entropy_backward(logits, onehot)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_logits, onehot.argmax(-1), reduction="sum")
    ref.backward()
    torch.testing.assert_close(TorchOps.loss_sum(*([t] for t in terms), 4), ref.detach())
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def _wrong_products(rank: int, n: int) -> dict[int, int]:
    """Per precision: how many of n products x * 1 (x = 1000 at 24 bits, 10 at 16) are wild."""
    import crypten

    wrong = {}
    for bits, value in ((24, 1000.0), (16, 10.0)):
        with crypten.cfg.temp_override({"encoder.precision_bits": bits}):
            x = crypten.cryptensor(torch.full((n,), value), src=0)
            z = (x * crypten.cryptensor(torch.ones(n), src=0)).get_plain_text()
            wrong[bits] = int(((z - value).abs() > 1.0).sum())
    return wrong


@pytest.mark.parametrize("parties", [2, 3])
def test_truncation_fails_at_rate_x_times_2_to_2bits_minus_64_for_any_party_count(parties):
    """CrypTen's truncation of a product x (encoded at 2 * bits) gives a wild value with
    probability ~|x| 2^(2 bits - 64): 2 parties by local share division, 3+ because the
    dealer's wrap count ignores the x + r wrap. Why config.MpcConfig.precision_bits is 16 for
    every party count (expected wrong of 1e5: ~1526 at 24 bits and x = 1000, ~2e-4 at 16/10)."""
    wrong = run_multiparty(_wrong_products, parties=parties, args=(100_000,))[0]
    assert 800 < wrong[24] < 2500, wrong
    assert wrong[16] == 0, wrong


def test_gelu_fit_with_cryptens_exp_is_within_7e_5_of_the_tanh_form():
    """ops.GELU_EXP in float, with exp computed as CrypTen does ((1 + y/256)^256): the
    approximation itself; fixed point adds ~1e-3 under MPC (test_component_forward_and_gradient)."""
    from mpc_ft.ops import GELU_EXP

    a, b, d = GELU_EXP
    x = torch.linspace(-23, 23, 20001, dtype=torch.float64)
    t = x.abs()
    e = (1 - (a * t + b * t**2 + d * t**3) / 256) ** 256
    approx = x.clamp(min=0) - 0.5 * t * e
    assert (approx - TorchOps.gelu(x)).abs().max().item() < 7e-5
    # the limit ops.py states: exp's argument reaches CrypTen's -512 between |x| 23.6 and 23.7
    p = [a * t + b * t**2 + d * t**3 for t in (23.6, 23.7)]
    assert p[0] < 512 < p[1]
