"""The head's building blocks, in two backends with one meaning: plaintext torch and CrypTen.

`TorchOps` is the plaintext twin: ordinary torch autograd. `MpcOps` computes the same functions on
secret shares. CrypTen lacks LayerNorm, GELU, masked attention and a usable cross-entropy, and its
`inv_sqrt` has no autograd, so the MPC backend implements these as CrypTen autograd functions with
hand-derived backward passes (registered by `compat.init_party`):

- `mpcft_normalize`: (x - mean) / sqrt(var + eps) over the last dim, one inverse square root per
  row; backward: dx = r * (g - mean(g) - xhat * mean(g * xhat)).
- `mpcft_masked_softmax`: exp(s - rowmax) * mask / sum; the mask multiplies the exponentials (adding
  -1e9 would break CrypTen's exp below -512); the row max is taken without gradient (CrypTen's max
  would cut it); backward: ds = p * (g - sum(g * p)).
- `mpcft_cross_entropy`: mean over the batch of logsumexp(l) - <y, l>; the log only ever sees the
  row sum of exponentials in [1, C] (`log_in_range`: CrypTen's log reads low there, see its
  docstring); backward: (softmax - y) / B.

Traps from shared/CRYPTEN_NOTES.md avoided here (each pinned in tests/test_mpc_ops.py): indexing
drops gradients (we use narrow/index_select), `max()` cuts gradients (taken on detached values),
`var(unbiased=False)` is inverted (we use the mean of squares), `x ** 2` raises (we use square()).
"""

from __future__ import annotations

import contextlib
import math
from functools import cache
from typing import Any

import torch

from mpc_ft import compare, rounds
from mpc_ft.cost_model import (
    NORM_SQRT_ITERS,
    RECIPROCAL_TOL,
    log_refinement,
    reciprocal_resolves,
    reciprocal_start,
    reciprocal_steps,
)

GELU_K = math.sqrt(2.0 / math.pi)
# MpcOps.gelu: relu(x) - g(|x|) with g(t) = t sigmoid(-2k(t + 0.044715 t^3)) (the tanh form's
# exact remainder) approximated by 0.5 t exp(-(a t + b t^2 + d t^3)), with exp as CrypTen
# computes it, (1 + y/256)^256 (functions.exp_iterations = 8); minimax fit on [0, 12]: max error
# 6.7e-5 (tests/test_mpc_ops.py). exp's argument stays above CrypTen's -512 limit for |x| < 23.6;
# beyond, exp and so GELU blow up (0.78 off at 23.6, 2e9 at 24): README, Known limits.
GELU_EXP = (0.79814153, 0.32237375, 0.02365409)
QUAD_C = 5.0  # 2Quad's shift (MPCFormer)


class TorchOps:
    """Plaintext backend: the twin and the reference for every parity test."""

    name = "plaintext"

    @staticmethod
    def linear(x: Any, weight: Any, bias: Any) -> Any:
        return x.matmul(weight) + bias

    @staticmethod
    def affine(x: Any, gamma: Any, beta: Any) -> Any:
        """A normalisation's gain and shift over the last dim."""
        return x * gamma + beta

    @classmethod
    def layer_norm(cls, x: Any, gamma: Any, beta: Any, eps: float) -> Any:
        return cls.affine(cls.normalize(x, eps), gamma, beta)

    @staticmethod
    def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
        """LayerNorm without its affine part: (x - mean) / sqrt(var + eps) over the last dim."""
        centred = x - x.mean(-1, keepdim=True)
        var = centred.square().mean(-1, keepdim=True)
        return centred * torch.rsqrt(var + eps)

    @staticmethod
    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(GELU_K * (x + 0.044715 * x * x.square())))

    @staticmethod
    def quad_activation(x: Any) -> Any:
        """MPCFormer's Quad in place of GELU: 0.125 x^2 + 0.25 x + 0.5 (one square)."""
        return x.square() * 0.125 + x * 0.25 + 0.5

    @classmethod
    def center(cls, x: Any, gamma: Any, beta: Any, eps: float) -> Any:
        """Normalisation without scaling: (x - mean) * gamma + beta (linear: free in MPC)."""
        return cls.affine(cls.centred(x, eps), gamma, beta)

    @staticmethod
    def centred(x: Any, eps: float) -> Any:
        """`center` without its gain and shift: x - mean (eps unused: no division)."""
        return x - x.mean(-1, keepdim=True)

    @classmethod
    def quad_attention(cls, scores: Any, mask: Any, inv_count: Any = None) -> Any:
        """MPCFormer's 2Quad, (s + c)^2 over the real keys, normalised by c^2 times the number
        of real keys instead of by its row sum: no division of secrets (scores [B,H,T,T],
        mask [B,1,1,T], inv_count [B,1])."""
        inv_count = (
            cls.inverse_count(mask.reshape(mask.size(0), -1)) if inv_count is None else inv_count
        )
        scale = inv_count.reshape(-1, 1, 1, 1) * (1.0 / QUAD_C**2)
        return (scores + QUAD_C).square() * (mask * scale)

    @staticmethod
    def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shifted = scores - scores.detach().amax(-1, keepdim=True)
        e = shifted.exp() * mask
        return e / e.sum(-1, keepdim=True)

    @staticmethod
    def inverse_count(mask: torch.Tensor) -> torch.Tensor:
        """mask [B,T] -> [B,1]: 1 / the number of real tokens of each row."""
        return 1.0 / mask.sum(1, keepdim=True)

    @classmethod
    def masked_mean(cls, h: Any, mask: Any, inv_count: Any = None) -> Any:
        """h [B,T,D], mask [B,T] -> [B,D]: mean over the real tokens of each row, as one
        batched product of the token weights mask / count [B,1,T] with h. Under MPC its backward
        opens only the [B,D] gradient (h * mask opened a [B,T,D] one)."""
        inv_count = cls.inverse_count(mask) if inv_count is None else inv_count
        return (mask * inv_count).unsqueeze(1).matmul(h).squeeze(1)

    @staticmethod
    def cross_entropy(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(logits, -1) - (onehot * logits).sum(-1)).mean()

    @staticmethod
    def cross_entropy_backward(
        logits: torch.Tensor, onehot: torch.Tensor, weight: Any = None
    ) -> tuple[Any, Any]:
        """Backpropagate the batch's SUMMED softmax cross-entropy from `logits` (gradient
        softmax - y, times each row's `weight` [B,1] if given: DP's secret inclusion bits,
        dp.py; train.sgd_step takes the mean) without computing the loss; return its terms
        for `loss_sum`: shift - <y, l> and the row sums of exp(l - shift), each [B,1], with shift
        the row max. Why the sum: the mean's 1/B, applied here, shrinks every backward value B
        times, and under MPC that costs log2(B) bits of the gradients' fixed-point resolution
        (the reference head's gradients were up to 60% off with it, 24% without)."""
        with torch.no_grad():
            shift = logits.amax(-1, keepdim=True)
            e = (logits - shift).exp()
            total = e.sum(-1, keepdim=True)
            offset = shift - (onehot * logits).sum(-1, keepdim=True)
            seed = e / total - onehot
        logits.backward(seed if weight is None else seed * weight)
        return offset, total

    @staticmethod
    def loss_sum(offsets: list[Any], totals: list[Any], classes: int) -> Any:
        """Summed cross-entropy from deferred terms: sum(offset) + sum(log(total)); each total
        lies in [1, classes] (MpcOps needs the bound)."""
        return torch.cat(offsets).sum() + torch.cat(totals).log().sum()

    @staticmethod
    def cat(values: list[Any]) -> Any:
        return torch.cat(values)

    @staticmethod
    def correct(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Number of rows whose argmax is the labelled class (a 0-dim tensor)."""
        return (logits.argmax(-1) == onehot.argmax(-1)).sum().float()

    # --- autograd and data plumbing, so one training loop serves both backends ---------------
    @staticmethod
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    @staticmethod
    def no_grad() -> contextlib.AbstractContextManager:
        return torch.no_grad()

    @staticmethod
    def step_triples() -> contextlib.AbstractContextManager:
        """Around each training step: MPC's offline phase (offline.py); nothing in plaintext."""
        return contextlib.nullcontext()

    @staticmethod
    def rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index)

    @staticmethod
    def stack(values: list[Any]) -> Any:
        return torch.stack(values)

    @staticmethod
    def zero() -> torch.Tensor:
        return torch.zeros(())

    @staticmethod
    def signed_sum(t: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """sum(t * signs) for public integer signs (watchdog.py)."""
        return (t.detach() * signs).sum()


class MpcOps(TorchOps):
    """CrypTen backend: the same functions on secret shares (CrypTensor on the left of every op)."""

    name = "mpc"

    def __init__(self, crypten: Any, triples_ahead: bool = True, reuse_openings: bool = True
                 ) -> None:  # fmt: skip
        """triples_ahead: offline.py; reuse_openings: products.py (set for this process)."""
        from mpc_ft import compat
        from mpc_ft.offline import TripleCache

        self.crypten = crypten
        self.triples = TripleCache(crypten) if triples_ahead else None
        compat.reuse_openings(reuse_openings)

    def step_triples(self) -> contextlib.AbstractContextManager:
        """The step's Beaver triples from one dealer request made just before it (offline.py)."""
        return self.triples.step() if self.triples else contextlib.nullcontext()

    @staticmethod
    def normalize(x: Any, eps: float) -> Any:
        return x.mpcft_normalize(eps)

    @staticmethod
    def gelu(x: Any) -> Any:
        return x.mpcft_gelu()

    @staticmethod
    def masked_softmax(scores: Any, mask: Any) -> Any:
        return scores.mpcft_masked_softmax(mask)

    @staticmethod
    def inverse_count(mask: Any) -> Any:
        """One ranged reciprocal per example; data owners normally share it instead (free)."""
        return reciprocal_in_range(mask.sum(1, keepdim=True), 1.0, float(mask.size(1)))

    @staticmethod
    def cross_entropy(logits: Any, onehot: Any) -> Any:
        return logits.mpcft_cross_entropy(onehot)

    def cross_entropy_backward(
        self, logits: Any, onehot: Any, weight: Any = None
    ) -> tuple[Any, Any]:
        """As TorchOps.cross_entropy_backward. No log per step: the loss is only revealed per
        epoch, so its log runs once per epoch over every example (`loss_sum`)."""
        with self.crypten.no_grad():
            values = logits.detach()
            shift, total, p, dot = softmax_parts(values, onehot)
            offset = shift - dot
            seed = p - onehot if weight is None else (p - onehot) * weight
        logits.backward(seed)
        return offset, total

    def loss_sum(self, offsets: list[Any], totals: list[Any], classes: int) -> Any:
        totals = self.crypten.cat(totals)
        return self.crypten.cat(offsets).sum() + log_in_range(totals, 1.0, float(classes)).sum()

    def cat(self, values: list[Any]) -> Any:
        return self.crypten.cat(values)

    @staticmethod
    def correct(logits: Any, onehot: Any) -> Any:
        return (logits.argmax(dim=-1, one_hot=True) * onehot).sum()

    def leaf(self, t: Any) -> Any:
        """A fresh leaf. CrypTen's detach() clones through autograd when autograd is on, so a
        leaf made from a tensor that requires grad would hang in the graph as an inner node
        and never receive a gradient: detach with autograd off."""
        with self.crypten.no_grad():
            t = t.detach()
        t.requires_grad = True
        return t

    def no_grad(self) -> contextlib.AbstractContextManager:
        return self.crypten.no_grad()

    def stack(self, values: list[Any]) -> Any:
        return self.crypten.stack(values)

    def zero(self) -> Any:
        return self.crypten.cryptensor(torch.zeros(()))

    def signed_sum(self, t: Any, signs: torch.Tensor) -> Any:
        """sum(t * signs) on the raw shares: exact in the ring for any value. CrypTen's own
        `t * signs` encodes the integers as fixed point, and its product wraps to a wrong value
        once |t| > 2^(63 - 2 bits) (2^31 at 16 bits): exactly the values the watchdog seeks."""
        with self.crypten.no_grad():
            out = t.sum()  # the encoding and the shape of the result; the share replaced:
        out.share = (t.share * signs).sum()
        return out


class PerUnitOps:
    """Another backend's ops for parameters with a leading unit dim k: each of k units (an
    example, or a DP microbatch of m consecutive rows) computes with its own copy of every
    parameter, so that one forward and backward pass gives each unit's own gradient
    (`units(p, k)`; dp.py clips them). Only the ops that touch parameters change: a linear
    map runs as one batched product [k, m*T, d] @ [k, d, e] (tokens and a unit's rows share
    its weights), a normalisation's gain and shift broadcast over the unit's rows and tokens.
    Under MPC the copies cost openings (k times each weight), not rounds."""

    def __init__(self, base: Any, units: int) -> None:
        self.base, self.units = base, units

    def __getattr__(self, name: str) -> Any:  # everything parameter-free: the base's own
        return getattr(self.base, name)

    def _by_unit(self, x: Any) -> Any:  # [B, ..., d] -> [k, B/k * ..., d]
        return x.reshape(self.units, -1, x.size(-1))

    def _param(self, p: Any) -> Any:  # a per-unit vector [k, d] -> [k, 1, d]
        return p.reshape(self.units, 1, -1)

    def linear(self, x: Any, weight: Any, bias: Any) -> Any:
        out = self._by_unit(x).matmul(weight) + self._param(bias)
        return out.reshape(*tuple(x.size())[:-1], weight.size(-1))

    def affine(self, x: Any, gamma: Any, beta: Any) -> Any:
        out = self._by_unit(x) * self._param(gamma) + self._param(beta)
        return out.reshape(tuple(x.size()))

    def layer_norm(self, x: Any, gamma: Any, beta: Any, eps: float) -> Any:
        return self.affine(self.base.normalize(x, eps), gamma, beta)

    def center(self, x: Any, gamma: Any, beta: Any, eps: float) -> Any:
        return self.affine(self.base.centred(x, eps), gamma, beta)


def unflatten(flat: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A flat vector (plain or shared) back into named tensors of `shapes`, in order."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = flat.narrow(0, offset, size).reshape(shape)
        offset += size
    return out


def units(p: Any, k: int) -> Any:
    """k stacked copies of a parameter (plain or shared): [k, *p.shape]."""
    return p.unsqueeze(0).repeat(k, *([1] * p.dim()))


# --- CrypTen autograd functions (classes built lazily: importing ops must not import crypten) ---


def reciprocal_in_range(x: Any, lo: float, hi: float, tol: float = RECIPROCAL_TOL) -> Any:
    """1/x for x known to lie in [lo, hi] (public bounds, 0 < lo < hi).

    Start from the line closest to 1/x over [lo, hi] (cost_model.reciprocal_start: relative
    error within (k - 1)^2 / (k^2 + 6k + 1), k = hi / lo; a public multiply, local with 2
    parties), then Newton-Raphson y <- y (2 - x y), 2 products per step, each squaring the
    error, until it is below `tol` (by default one unit of the 16-bit fixed point). The line
    is evaluated as beta (c - x) with beta carried precisely (`times_small`); at hi it is
    (1 - e0) / hi, which must be a few units of the fixed point: ranges wider than about
    hi / lo = 360 at 16 bits (the masked softmax's [1, T] with T above 360) raise ValueError
    (Newton from a start of one unit or zero would not converge; the previous start,
    2 / (lo + hi), returned inf from hi / lo = 512 in a float model of the fixed point, without
    an error). CrypTen's reciprocal spends an exp on its start and 10 steps to cover any range."""
    steps = reciprocal_steps(lo, hi, tol)
    alpha, beta, _ = reciprocal_start(lo, hi)
    if hasattr(x, "encoder") and not reciprocal_resolves(lo, hi, x.encoder._precision_bits):
        raise ValueError(  # Newton from a start of a unit or zero would not converge
            f"reciprocal over [{lo}, {hi}]: its start at {hi} ({beta * lo:.1e}) is below 4 units "
            f"of {x.encoder._precision_bits}-bit fixed point; the range is too wide (hi/lo "
            f"above ~{math.isqrt(2 ** (x.encoder._precision_bits + 1))})"
        )
    y = times_small(alpha / beta - x, beta)  # beta (c - x): no coarse alpha, exact c - x >= lo
    for _ in range(steps - 1):
        y = y * (2 - x * y)
    return y


def times_small(x: Any, c: float) -> Any:
    """x * c for a public c that x's fixed point would encode coarsely (|c| << 1): CrypTen
    encodes c at x's bits, so c = 1.2e-4 (the reciprocal's start over [1, 256]) would be 2.5%
    off, and the start's error would pass 1 (Newton then diverges). Here c is carried as the
    integer C = round(c 2^k), 2^14 <= |C| < 2^15 (a product by an int: no truncation), and the
    result divided by 2^k: the one truncation of any public multiply, on a raw value below
    2^15 |x| 2^bits. Plain torch tensors: x * c."""
    if not hasattr(x, "encoder"):
        return x * c
    bits = x.encoder._precision_bits
    k = max(bits, 14 - math.floor(math.log2(abs(c)))) if c else bits
    if k == bits:
        return x * c
    return (x * round(c * 2**k)).div(2**k)


def log_in_range(x: Any, lo: float, hi: float, tol: float = 1e-5) -> Any:
    """log(x) for x known to lie in [lo, hi] (public bounds, 1e-4 <= lo < hi <= 250).

    CrypTen's log alone is biased and noisy: its Householder steps h = 1 - x exp(-y) use exp's
    limit form (1 - y/256)^256 = exp(-y - y^2/512 - ...), so they settle on y + y^2/512 = log x
    (9e-4 low at x = 2), and exp's 8 squarings multiply the rounding of 1 - y/256 by 256 (on
    [1, 2]: mean error -8e-4, spread 1.9e-3 with 2 parties and 4.5e-3 with 3). One more
    Householder step from its result y, with an exp that is accurate where y lies, removes both
    (public plan: cost_model.log_refinement):
    v = (y - c) / 2^s (c the centre of [log lo, log hi]; s = 0 for [1, 2]); e = exp(-(y - c))
    as exp(-v)'s Taylor polynomial squared s times; h = 1 - (x e^-c) e, near 0;
    log x = y + log(1 - h) = y - (h + h^2/2 + ...), the series to the plan's order."""
    c, s, degree, order = log_refinement(lo, hi, tol)
    y = x.log()
    v = (y - c) * (1.0 / 2**s) if s else y - c  # scaled first: 1/(k! 2^sk) rounds to 0
    e = v.polynomial([(-1) ** k / math.factorial(k) for k in range(1, degree + 1)]) + 1
    for _ in range(s):
        e = e.square()
    h = 1 - (x * math.exp(-c)) * e
    return y - h.polynomial([1.0 / k for k in range(1, order + 1)])


def row_max(x: Any) -> Any:
    """Max over the last dim, keepdim, without gradient: a halving tree of max(a, b) =
    b + relu(a - b), one comparison per pair and level (ceil(log2 n) levels); relu's product
    by the comparison's bit opens a - b only (compare.relu).

    CrypTen's own max() computes an argmax first (the same tree, then an equality test and a
    random tie-break to make a one-hot) and reads the max through it: about twice the rounds
    and bytes for a value we use only to shift exp's argument."""
    while x.size(-1) > 1:
        n = x.size(-1)
        half = n // 2
        a, b = x.narrow(-1, 0, half), x.narrow(-1, half, half)
        top = b + compare.relu(a - b)
        if n % 2:
            import crypten

            top = crypten.cat([top, x.narrow(-1, n - 1, 1)], dim=-1)
        x = top
    return x


EXP_BITS = 20  # exp_nonpositive's working precision


def exp_nonpositive(z: Any, iters: int = 8) -> Any:
    """CrypTen's exp, (1 + z/2^iters)^(2^iters), for z <= 0, with its base held at EXP_BITS
    fractional bits instead of the tensor's 16.

    At 16 bits the rounding of 1 + z/256 (one truncation: +-1 unit with 2 parties, +-3 with 3)
    is multiplied by 256 through the squarings: a relative error of 1.9e-3 (2 parties) and
    4.6e-3 (3 parties) rms, which made the loss of a 16-row batch wander by up to 1e-3. Here:
    t = z / 2^(16 + iters - EXP_BITS) (one truncation), whose raw shares are z/2^iters at
    EXP_BITS bits; b = 1 + t; `iters` squarings at EXP_BITS bits; one truncation back to 16
    bits (the only step added). 16x less noise; the limit form's own bias (-z^2/2^(iters+1)
    relative) stays. Wild values: b <= 1, so each squaring truncates a product below
    2^(2 EXP_BITS) in the ring: about 2^-24 per element ("Wild values", README), against
    |x| 2^-32 for the head's 16-bit products of size |x|."""
    return rounds.run(exp_nonpositive_steps(z, iters))[0]


def exp_nonpositive_steps(z: Any, iters: int = 8) -> rounds.Steps:
    """`exp_nonpositive` as steps of rounds.run (its squarings' openings)."""
    from crypten.mpc import MPCTensor

    bits = z.encoder._precision_bits
    t = z.div(2 ** (bits + iters - EXP_BITS))
    b = MPCTensor.from_shares(t.share, precision=EXP_BITS) + 1
    for _ in range(iters):
        b = yield from rounds.square_steps(b)
    return MPCTensor.from_shares(b.div(2 ** (EXP_BITS - bits)).share, precision=bits)


def softmax_parts(logits: Any, onehot: Any) -> tuple[Any, Any, Any, Any]:
    """Row max, row sum of exp(logits - max) (in [1, C]: the max term is exp(0)), softmax and
    <onehot, logits>, each [B,1] but the softmax, for the cross-entropy's loss and gradient
    (shares, no gradient recorded). Two classes: `two_class_parts`."""
    if logits.size(-1) == 2:
        return two_class_parts(logits, onehot)
    shift = row_max(logits)
    e = exp_nonpositive(logits - shift)
    total = e.sum(-1, keepdim=True)
    p = e * reciprocal_in_range(total, 1.0, float(logits.size(-1)))
    return shift, total, p, (onehot * logits).sum(-1, keepdim=True)


def two_class_parts(logits: Any, onehot: Any) -> tuple[Any, Any, Any, Any]:
    """`softmax_parts` for logits [B, 2] in 14 rounds instead of 23, by running the sign and
    the exp side by side (rounds.run). With d = l1 - l0 and s = [d < 0]:
    1. Together (8 rounds): s with 3 bit-product pairs (compare.negative_steps); exp(d) and
       exp(-d) (`exp_nonpositive_steps` on [d, -d]); onehot * logits.
    2. One exchange, products by the bit (compare.BitProducts, exact in the ring):
       E = exp(-|d|) = exp(-d) + s (exp(d) - exp(-d)); N = 1 + s (exp(d) - 1), which is 1 or
       exp(d); the max l0 + d - s d.
    3. q = 1 / (1 + E) over [1, 2] (`reciprocal_in_range`, 4 rounds); p1 = N q (1 round),
       p0 = 1 - p1.
    Only the exp of a non-positive argument is ever kept: exp(d) is computed for every row but
    used only where d < 0, exp(-d) only where d >= 0. The other one may be garbage (it
    overflows the ring from about d = 15), and is multiplied by an exact 0, which makes it 0.
    The row sum is 1 + E and the softmax [p0, p1], as the general path gives them."""
    import crypten

    from mpc_ft import compare

    l0, l1 = logits.narrow(-1, 0, 1), logits.narrow(-1, 1, 1)
    d = l1 - l0
    (_, by_neg), exps, dot = rounds.run(
        compare.negative_steps(d, 3),
        exp_nonpositive_steps(crypten.cat([d, -d], dim=-1)),
        rounds.mul_steps(onehot, logits),
    )
    up, down = exps.narrow(-1, 0, 1), exps.narrow(-1, 1, 1)  # exp(d), exp(-d)
    chosen, numerator, below = rounds.run(by_neg.times_steps([up - down, up - 1, d]))[0]
    total = down + chosen + 1  # 1 + exp(-|d|), in [1, 2]
    p1 = (numerator + 1) * reciprocal_in_range(total, 1.0, 2.0)
    shift = l1 - below  # max(l0, l1) = l1 - min(d, 0)
    return shift, total, crypten.cat([1 - p1, p1], dim=-1), dot.sum(-1, keepdim=True)


@cache
def mpc_autograd_functions() -> dict[str, type]:
    """name -> AutogradFunction subclass; compat registers them with CrypTen."""
    import crypten
    from crypten.gradients import AutogradContext, AutogradFunction

    from mpc_ft import compare

    class Normalize(AutogradFunction):
        @staticmethod
        def forward(ctx: Any, x: Any, eps: float) -> Any:
            centred = x - x.mean(-1, keepdim=True)
            var = centred.square().mean(-1, keepdim=True)  # not var(): its `unbiased` is inverted
            with crypten.cfg.temp_override({"functions.sqrt_nr_iters": NORM_SQRT_ITERS}):
                r = (var + eps).inv_sqrt()  # [..., 1]: one inverse square root per row
            xhat = centred * r
            ctx.save_multiple_for_backward([xhat, r])
            return xhat

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            xhat, r = ctx.saved_tensors
            inner = g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)
            return inner * r

    class MaskedSoftmax(AutogradFunction):
        @staticmethod
        def forward(ctx: Any, scores: Any, mask: Any) -> Any:
            # The max over real tokens only (padding pushed 1024 down), so that the row sum of
            # e = exp(scores - max) * mask lies in [1, T] and a ranged reciprocal suffices.
            shift = row_max(scores + (mask - 1) * 1024.0)  # no grad is recorded in forward
            e = (scores - shift).exp() * mask
            p = e * reciprocal_in_range(e.sum(-1, keepdim=True), 1.0, float(scores.size(-1)))
            ctx.mark_non_differentiable(mask)
            ctx.save_for_backward(p)
            return p

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            (p,) = ctx.saved_tensors
            return p * (g - (g * p).sum(-1, keepdim=True)), None

    class CrossEntropy(AutogradFunction):
        @staticmethod
        def forward(ctx: Any, logits: Any, onehot: Any) -> Any:
            shift, total, p, dot = softmax_parts(logits, onehot)
            logsumexp = log_in_range(total, 1.0, float(logits.size(-1))) + shift
            loss = (logsumexp - dot).mean()
            ctx.mark_non_differentiable(onehot)
            ctx.save_multiple_for_backward([p, onehot])
            return loss

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            p, onehot = ctx.saved_tensors
            return (p - onehot) * g.div(p.size(0)), None

    class Gelu(AutogradFunction):
        """The tanh-form GELU as relu(x) - g(|x|) (GELU_EXP): one comparison, one exp, and a
        hand-derived backward, instead of CrypTen's tanh (a comparison, an exp and a Newton
        reciprocal) with autograd through all of it.
        Forward: neg = [x < 0]; t = |x|; E = exp(-(a t + b t^2 + d t^3)); out = relu - t E / 2.
        Backward: d out / dx = [x >= 0] - sign(x) E (1 - a t - 2b t^2 - 3d t^3) / 2."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            a, b, d = GELU_EXP
            # neg: a 0/1 sharing (scale 1); products by it open one operand (compare.py step 5):
            # x * neg here, slope * neg in the backward if one follows (a real context)
            neg, by_neg = compare.negative(x, 2 if isinstance(ctx, AutogradContext) else 1)
            relu = x - by_neg.times(x)
            t = relu + relu - x
            t2 = t.square()
            t3 = t2 * t
            e = (t * -a + t2 * -b + t3 * -d).exp()
            ctx.save_multiple_for_backward([neg, by_neg, t, t2, t3, e])
            return relu - t * e * 0.5

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            a, b, d = GELU_EXP
            neg, by_neg, t, t2, t3, e = ctx.saved_tensors
            slope = e * (t * (-0.5 * a) + t2 * -b + t3 * (-1.5 * d) + 0.5)  # g'(t)
            sign_slope = slope - by_neg.times(slope) * 2
            return g * (1 - neg - sign_slope)

    return {
        "mpcft_gelu": Gelu,
        "mpcft_normalize": Normalize,
        "mpcft_masked_softmax": MaskedSoftmax,
        "mpcft_cross_entropy": CrossEntropy,
    }
