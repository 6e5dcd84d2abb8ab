"""Communication cost of CrypTen 0.4.1 operations from their shapes (TTP dealer, N parties).

Counted: the online phase of CrypTen's arithmetic secret sharing with the TTP provider, as
CrypTen's own per-party counters record it (`get_communication_stats`, fed by the `_logging`
decorator of its communicator): every communicator call is one "round"; bytes are 8 per counted
element. That is CrypTen's convention: an all_reduce (an opening) of n elements counts 2n (sent
and received) with 2 parties, and, opened by compat's direct exchange (patch 8), 2 (N - 1) n with
N, the wire bytes; a gather counts (N-1)n at the root and n elsewhere, a received
broadcast counts n. Truncation after a fixed-point multiply is local with 2 parties; with 3 it
is truncation.py's (party 2 sends n elements to party 1; party 0 neither sends nor waits), with 4+
CrypTen's wrap-count protocol (a dealer call, a gather to party 0).

Party 0 differs: every `Cost` holds `bytes`/`rounds` for parties 1..N-1 and `bytes0`/`rounds0`
for party 0, which alone talks to the dealer. Each tuple it fetches (Beaver triple, square pair,
wrap pair, bit pair) costs it 3 counted calls: `send_obj` of the request (counted as
sys.getsizeof of the dict, 184 B, not its pickled length), `recv_obj` of the size (getsizeof of
a torch.Size: 48 B + 8 B per dimension) and the dealer's broadcast of its share (8 B/element).
The other parties derive their tuple shares from seeds: 0 B.

Not counted (CrypTen's counters do not see it): the dealer process's own traffic, send_obj's
length headers, setup (seeds, barriers), sharing inputs (PRZS: free), the backward pass. With a
filled tuple cache (`crypten.fill_cache`) party 0's dealer calls happen at fill time instead.

Each function returns the communication CrypTen's protocol needs, given the shapes: a lower
bound of the measured count, and exactly it (tests/test_cost_model.py, 2 and 3 parties) for
CrypTen's default config, no tuple cache, and tensors of `ndim` dimensions (each function's
`ndim` argument; the components default to the shapes they name). Only party 0's bytes depend
on ndim: 8 B per dimension of every tuple it fetches. Precision above 16 bits adds B2A bits to
argmax's random tie-break (`precision_bits`). The components are the forward passes of
mpc_ft/ops.py (MpcOps) with every input secret-shared, as the head and the benchmarks run them;
autograd does not change a forward's communication, and the backward pass is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpc_ft import compare, truncation

# CrypTen 0.4.1 defaults (crypten/configs/default.yaml) and constants of its code.
EXP_ITERATIONS = 8  # functions.exp_iterations: exp(x) = (1 + x / 2^8)^(2^8)
RECIPROCAL_NR_ITERS = 10  # functions.reciprocal_nr_iters
SQRT_NR_ITERS = 3  # functions.sqrt_nr_iters (inv_sqrt)
# MpcOps.normalize's Newton steps for 1 / sqrt(var + eps) (CrypTen's default: 3). CrypTen's start
# is ~2 for small inputs, so 3 steps are right only on [0.1, 100]: 57% low at var 0.0044, where
# the first LayerNorm of the default head on Rotten Tomatoes starts (0.0044-0.19 over real
# tokens). 10 steps: within 2e-4 on [0.003, 100], 1.4e-3 at 0.001 (tests/test_mpc_ops.py).
NORM_SQRT_ITERS = 10
LOG_ITERATIONS = 2  # functions.log_iterations (Householder steps)
LOG_ORDER = 8  # functions.log_order (polynomial terms per step)
SIGMOID_NR_ITERS = 3  # sigmoid's own override of reciprocal_nr_iters (start value 0.75)
PRECISION_BITS = 16  # encoder.precision_bits: the bits of crypten.rand in argmax's tie-break
LOG_BITS = 6  # log2(64): rounds of the binary adder's carry tree
ELEMENT = 8  # bytes CrypTen counts per tensor element
REQUEST_BYTES = 184  # sys.getsizeof of the 4-key request dict (CPython 3.11)
SIZE_BYTES = 48  # sys.getsizeof of a 0-dim torch.Size; +8 per dimension


@dataclass(frozen=True)
class Cost:
    """Bytes and rounds one party's CrypTen counters record: parties 1..N-1, and party 0."""

    bytes: float = 0
    rounds: int = 0
    bytes0: float = 0
    rounds0: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.rounds + other.rounds,
                    self.bytes0 + other.bytes0, self.rounds0 + other.rounds0)  # fmt: skip

    def __mul__(self, k: int) -> Cost:
        return Cost(self.bytes * k, self.rounds * k, self.bytes0 * k, self.rounds0 * k)

    __rmul__ = __mul__

    def party(self, rank: int) -> tuple[float, int]:
        """(bytes, rounds) for computing party `rank`."""
        return (self.bytes0, self.rounds0) if rank == 0 else (self.bytes, self.rounds)


def _all(nbytes: float, rounds: int) -> Cost:
    return Cost(nbytes, rounds, nbytes, rounds)


def _opening(counted: float, parties: int) -> Cost:
    """One opening (an all_reduce, arithmetic or XOR) of tensors CrypTen counts as `counted`
    bytes (2 per element: sent and received). compat's patch 8 opens by a direct exchange: each
    party sends its share to each other party, (P - 1) times what CrypTen counts with 2."""
    return _all(counted * (parties - 1), 1)


def _dealer(numel: int, ndim: int) -> Cost:
    """Party 0 fetches its share of one tuple: send_obj request, recv_obj size, broadcast."""
    return Cost(bytes0=REQUEST_BYTES + SIZE_BYTES + ELEMENT * (ndim + numel), rounds0=3)


# --- primitives -----------------------------------------------------------------------------------


def open_(numel: int, parties: int) -> Cost:
    """get_plain_text / reveal: one all_reduce of the shares (counted as 2 * numel elements)."""
    return _opening(2 * ELEMENT * numel, parties)


def _fold(numel: int) -> Cost:
    """truncation.fold (3 parties): party 2 sends n elements to party 1, which receives them
    (each counts n, one round); party 0 neither sends nor waits."""
    return Cost(ELEMENT * numel, 1, 0, 0)


def public_mul(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """secret * public float or tensor, or / public int: only the truncation. 2 parties: local;
    3: one message from party 2 to party 1 (truncation.py); 4+: dealer wrap pair, gather of the
    masked shares to party 0. (* a Python int is free.)"""
    if parties == 2:
        return Cost()
    if parties == truncation.PARTIES:
        return _fold(numel)
    root = ELEMENT * numel * (parties - 1)
    return _dealer(numel, ndim) + Cost(ELEMENT * numel, 1, root, 1)


def _beaver(x_numel: int, y_numel: int, out_numel: int, ndim: int, parties: int) -> Cost:
    """Beaver product without truncation: dealer triple, one batched opening of x-a and y-b."""
    return _dealer(out_numel, ndim) + _opening(2 * ELEMENT * (x_numel + y_numel), parties)


def mul(numel: int, parties: int, *, y_numel: int | None = None, ndim: int = 1) -> Cost:
    """secret * secret elementwise (y may broadcast: `y_numel`): Beaver triple, one opening of
    epsilon and delta together, then the truncation of the numel products."""
    y = numel if y_numel is None else y_numel
    return _beaver(numel, y, numel, ndim, parties) + public_mul(numel, parties, ndim=ndim)


def matmul(m: int, k: int, n: int, parties: int, batch: int = 1, *, ndim: int | None = None
           ) -> Cost:  # fmt: skip
    """[batch,m,k] @ [batch,k,n] secret: Beaver triple, one opening of both masked operands,
    truncation of the batch*m*n outputs. `ndim` of the product: by default 2 for batch=1,
    otherwise 3 (the batch dims flattened; e.g. 4 for [B,H,T,hs] @ [B,H,hs,T])."""
    ndim = (2 if batch == 1 else 3) if ndim is None else ndim
    out = batch * m * n
    return _beaver(batch * m * k, batch * k * n, out, ndim, parties) + public_mul(
        out, parties, ndim=ndim
    )


def square(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """x.square(): dealer pair (r, r^2), one opening of x - r, truncation."""
    return _dealer(numel, ndim) + open_(numel, parties) + public_mul(numel, parties, ndim=ndim)


# --- comparisons: arithmetic -> binary, adder circuit, bit -> arithmetic --------------------------


def _and(numel: int, ndim: int, parties: int) -> Cost:
    """Binary AND: dealer triple, one opening of x^a and y^b."""
    return _dealer(numel, ndim) + _opening(4 * ELEMENT * numel, parties)


def _b2a_bit(numel: int, ndim: int, parties: int) -> Cost:
    """One shared bit to arithmetic: dealer bit pair, one opening of x ^ r."""
    return _dealer(numel, ndim) + _opening(2 * ELEMENT * numel, parties)


def ltz(numel: int, parties: int, *, ndim: int = 1, products: int = 0) -> Cost:
    """x < 0 (also sign, lt, gt, ge, le), as compat patch 12 computes it (compare.py): with
    3 parties truncation.fold to two shares, with P > 3 P - 2 carry-save steps on x's shape (an
    AND each) down to two operands; then
    the carry into the top bit on the flattened words, padded to a multiple of 64: an AND of all
    of them and one per level on 1/2, 1/4, ... 1/32 as many (bits packed); one bit back to
    arithmetic (a dealer bit pair on the flattened shape; the opening packed, a 64th of a word
    per bit). 2 parties: 8 rounds; 3 parties: 9. (CrypTen's own: full adders, 13 AND-words per
    element and 7 rounds each: 8 rounds with 2 parties, 15 with 3.) `products`: the dealer's bit
    comes with that many pairs for products by the bit (compare.negative), in one answer."""
    cost = Cost()
    if parties == truncation.PARTIES:
        cost += _fold(numel)
    else:
        for _ in range(parties - 2):
            cost += _and(numel, ndim, parties)
    words = -(-numel // compare.BITS) * compare.BITS
    cost += _and(words, 1, parties)
    for level in range(compare.LEVELS):
        cost += _and(words >> level, 1, parties)
    bit = _dealer(numel * (1 + products), 1)
    return cost + bit + _opening(2 * ELEMENT * (words // compare.BITS), parties)


def _by_bit(numel: int, parties: int) -> Cost:
    """y * [x < 0] by compare.BitProducts: one opening of y - a (its pair came with the bit);
    the bit is an integer: no truncation."""
    return open_(numel, parties)


def bit_relu(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """compare.relu: x - x [x < 0], the product by the bit opening x only."""
    return ltz(numel, parties, ndim=ndim, products=1) + _by_bit(numel, parties)


def relu(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """CrypTen's relu, x * (x >= 0): ltz, then a Beaver product by a 0/1 value (scale 1: no
    truncation)."""
    return ltz(numel, parties, ndim=ndim) + _beaver(numel, numel, numel, ndim, parties)


def _eq(numel: int, parties: int, ndim: int) -> Cost:
    """x == y. 2 parties: equality circuit on binary shares (6 ANDs) and bit to arithmetic;
    3+: 1 - (ltz(d) + ltz(-d)), both in one ltz of the stacked [d, -d]."""
    if parties == 2:
        return LOG_BITS * _and(numel, ndim, parties) + _b2a_bit(numel, ndim, parties)
    return ltz(2 * numel, parties, ndim=ndim + 1)


# --- max and argmax (functions.max_method: log_reduction) -----------------------------------------


def _weighted_index(rows: int, cols: int, parties: int, bits: int, ndim: int) -> Cost:
    """Random tie-break of a one-hot [rows, cols]: crypten.rand per row (bits B2A conversions),
    a Beaver product by the row total, and cumsum > r (ltz)."""
    rand = _b2a_bit(bits * rows, ndim + 1, parties)
    return rand + _beaver(rows, rows, rows, ndim, parties) + ltz(rows * cols, parties, ndim=ndim)


def _pairwise_max(rows: int, m: int, parties: int, bits: int, ndim: int) -> Cost:
    """max_method "pairwise" on [rows, m]: all (m-1) rolled comparisons in one ltz, product of
    the 0/1 results (tree of Beaver products), tie-break, then sum(x * one_hot)."""
    k = max(m, 2) - 1
    cost = ltz(k * rows * m, parties, ndim=ndim + 1)
    while k > 1:
        half = (k // 2) * rows * m
        cost += _beaver(half, half, half, ndim + 1, parties)
        k -= k // 2
    cost += _weighted_index(rows, m, parties, bits, ndim)
    return cost + _beaver(rows * m, rows * m, rows * m, ndim, parties)


def max_(rows: int, cols: int, parties: int, *, precision_bits: int = PRECISION_BITS) -> Cost:
    """x.max(-1) on [rows, cols]: int(ln cols) halving steps (ltz of x - y and a 2-product
    select), pairwise max of the rest, then the one-hot: eq(x, max) and a random tie-break."""
    cost, m = Cost(), cols
    for _ in range(int(math.log(cols))):
        half = rows * (m // 2)
        cost += ltz(half, parties, ndim=2) + 2 * _beaver(half, half, half, 2, parties)
        m -= m // 2
    cost += _pairwise_max(rows, m, parties, precision_bits, 2)
    eq = _eq(rows * cols, parties, 2)
    return cost + eq + _weighted_index(rows, cols, parties, precision_bits, 2)


def argmax(rows: int, cols: int, parties: int, *, precision_bits: int = PRECISION_BITS) -> Cost:
    """x.argmax(-1, one_hot=True): the same protocol as max_ (CrypTen computes both)."""
    return max_(rows, cols, parties, precision_bits=precision_bits)


# --- iterative approximations ---------------------------------------------------------------------


def exp(numel: int, parties: int, *, iters: int = EXP_ITERATIONS, ndim: int = 1) -> Cost:
    """(1 + x / 2^iters)^(2^iters): one public division, then `iters` squarings."""
    return public_mul(numel, parties, ndim=ndim) + iters * square(numel, parties, ndim=ndim)


def _newton_reciprocal(n: int, parties: int, iters: int, public_start: bool, ndim: int) -> Cost:
    """Newton-Raphson r <- 2r - x r^2: square + mul per step. The start is 3 exp(1 - 2x) + 0.003,
    or (sigmoid) the public 0.75, whose first step is a public multiply."""
    step = square(n, parties, ndim=ndim) + mul(n, parties, ndim=ndim)
    if public_start:
        return public_mul(n, parties, ndim=ndim) + (iters - 1) * step
    return exp(n, parties, ndim=ndim) + iters * step


def reciprocal(numel: int, parties: int, *, all_pos: bool = False, ndim: int = 1) -> Cost:
    """1/x, NR with 10 iterations. Unless reciprocal_all_pos (compat.all_positive()): sign by
    ltz, |x| = sign * x and the result times sign (two Beaver products, no truncation)."""
    cost = _newton_reciprocal(numel, parties, RECIPROCAL_NR_ITERS, False, ndim)
    if not all_pos:
        cost += ltz(numel, parties, ndim=ndim) + 2 * _beaver(numel, numel, numel, ndim, parties)
    return cost


def inv_sqrt(numel: int, parties: int, *, ndim: int = 1, steps: int = SQRT_NR_ITERS) -> Cost:
    """Start 2.2 exp(-(x/2 + 0.2)) + 0.2 - x/1024 (3 public mul/div, exp), then `steps` NR steps
    y <- y (3 - x y^2) / 2 (square, 2 mul, public div each)."""
    pub = public_mul(numel, parties, ndim=ndim)
    step = square(numel, parties, ndim=ndim) + 2 * mul(numel, parties, ndim=ndim) + pub
    return 3 * pub + exp(numel, parties, ndim=ndim) + steps * step


def sqrt(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """inv_sqrt(x) * x."""
    return inv_sqrt(numel, parties, ndim=ndim) + mul(numel, parties, ndim=ndim)


def log(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """Start x/120 - 20 exp(-2x - 1) + 3, then 2 Householder steps: h = 1 - x exp(-y) and an
    order-8 polynomial in h (square, 2 stacked products, a public multiply of the 8 terms)."""
    n = numel
    poly = (square(n, parties, ndim=ndim) + mul(2 * n, parties, y_numel=n, ndim=ndim + 1)
            + mul(4 * n, parties, y_numel=n, ndim=ndim + 1)
            + public_mul(LOG_ORDER * n, parties, ndim=ndim + 1))  # fmt: skip
    step = exp(n, parties, ndim=ndim) + mul(n, parties, ndim=ndim) + poly
    return public_mul(n, parties, ndim=ndim) + exp(n, parties, ndim=ndim) + LOG_ITERATIONS * step


def sigmoid(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """Default method "reciprocal": ltz, |x| = x * sign, exp(-|x|), 3 NR steps from 0.75 for
    1/(1 + exp(-|x|)), then where(ltz, ...) (two Beaver products; 0/1 factors: no truncation)."""
    bit_mul = _beaver(numel, numel, numel, ndim, parties)
    one_over = _newton_reciprocal(numel, parties, SIGMOID_NR_ITERS, True, ndim)
    return ltz(numel, parties, ndim=ndim) + exp(numel, parties, ndim=ndim) + one_over + 3 * bit_mul


def tanh(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """2 sigmoid(2x) - 1: the integer multiplies are local, so one sigmoid."""
    return sigmoid(numel, parties, ndim=ndim)


# --- mpc_ft/ops.py's own primitives ---------------------------------------------------------------


RECIPROCAL_TOL = 2.0**-16  # one unit of the default 16-bit fixed point


def reciprocal_start(lo: float, hi: float) -> tuple[float, float, float]:
    """(alpha, beta, e0): the line y0 = alpha - beta x closest to 1/x over [lo, hi] in relative
    error, and that error. For k = hi / lo, 1 - x y0 equioscillates at lo, hi and (lo + hi) / 2:
    beta lo^2 = 8 / (k^2 + 6k + 1), alpha lo = beta lo^2 (k + 1), e0 = (k - 1)^2 / (k^2 + 6k + 1)
    (Newton's first step from the best constant 2 / (lo + hi), also a line: (k-1)^2 / (k+1)^2)."""
    k = hi / lo
    scaled = 8.0 / (k * k + 6 * k + 1)
    return scaled * (k + 1) / lo, scaled / (lo * lo), (k - 1) ** 2 / (k * k + 6 * k + 1)


def reciprocal_resolves(lo: float, hi: float, bits: int) -> bool:
    """Whether the start line's value at hi, (1 - e0) / hi = beta lo, is at least 4 units of
    `bits`-bit fixed point (Newton from a start of a unit or zero does not converge): at 16
    bits, hi / lo up to about 360."""
    _, beta, _ = reciprocal_start(lo, hi)
    return beta * lo >= 4 * 2.0**-bits


def reciprocal_steps(lo: float, hi: float, tol: float = RECIPROCAL_TOL) -> int:
    """Steps of ops.reciprocal_in_range over [lo, hi] to reach relative error `tol`: the
    start (a public line, `reciprocal_start`), then Newton steps, each squaring the error."""
    e0 = reciprocal_start(lo, hi)[2]
    if e0 <= tol:
        return 1
    return 1 + max(0, math.ceil(math.log2(math.log(tol) / math.log(e0))))


def reciprocal_in_range(numel: int, parties: int, lo: float, hi: float, *,
                        tol: float = RECIPROCAL_TOL, ndim: int = 1) -> Cost:  # fmt: skip
    """ops.reciprocal_in_range: the start, a public line in x, is a public multiply; each
    Newton step 2 products (x * y, then y * (2 - x y))."""
    steps = reciprocal_steps(lo, hi, tol)
    return public_mul(numel, parties, ndim=ndim) + (steps - 1) * 2 * mul(numel, parties, ndim=ndim)


def log_refinement(lo: float, hi: float, tol: float = 1e-5) -> tuple[float, int, int, int]:
    """ops.log_in_range's public plan over [lo, hi] (ops uses this): the centre c of
    [log lo, log hi]; s, the halvings that bring exp's argument y - c within 1/2 (its start
    error included: CrypTen's log is within 2% plus 0.05, `margin`); the Taylor degree of
    exp(-(y - c) / 2^s) and the order of the final series in h, each to tol / 2."""
    a, b = math.log(lo), math.log(hi)
    margin = 0.05 + 0.02 * max(abs(a), abs(b))
    r = (b - a) / 2 + margin
    s = max(0, math.ceil(math.log2(r / 0.5)))
    v, degree = r / 2**s, 1
    while v ** (degree + 1) / math.factorial(degree + 1) * math.exp(v) * 2**s > tol / 2:
        degree += 1
    h, order = math.expm1(margin), 1
    while h ** (order + 1) / (order + 1) / (1 - h) > tol / 2:
        order += 1
    return (a + b) / 2, s, degree, order


def _polynomial(n: int, parties: int, degree: int, ndim: int) -> Cost:
    """CrypTen's polynomial (no constant term) of degree d on n elements: the powers by a
    doubling tree (a square, then stacked products by the highest power) and one public
    multiply of the d terms (degree 1: that multiply alone)."""
    if degree == 1:
        return public_mul(n, parties, ndim=ndim)
    cost, k = square(n, parties, ndim=ndim), 2
    while k < degree:
        cost += mul(k * n, parties, y_numel=n, ndim=ndim + 1)
        k *= 2
    return cost + public_mul(degree * n, parties, ndim=ndim + 1)


def log_in_range(numel: int, parties: int, lo: float, hi: float, *, tol: float = 1e-5,
                 ndim: int = 1) -> Cost:  # fmt: skip
    """ops.log_in_range: CrypTen's log, then one Householder step: (s > 0) the public scaling
    of exp's argument, exp's Taylor polynomial and its s squarings, x e^-c (a public
    multiply), its product with exp, the series in h."""
    _, s, degree, order = log_refinement(lo, hi, tol)
    n = numel
    return (log(n, parties, ndim=ndim) + _polynomial(n, parties, degree, ndim)
            + s * square(n, parties, ndim=ndim) + (1 + (s > 0)) * public_mul(n, parties, ndim=ndim)
            + mul(n, parties, ndim=ndim) + _polynomial(n, parties, order, ndim))  # fmt: skip


def row_max(rows: int, cols: int, parties: int, *, ndim: int = 2) -> Cost:
    """ops.row_max on [rows, cols]: a halving tree, max(a, b) = b + relu(a - b) (compare.relu)
    on the cols // 2 pairs of each level (an odd last column joins the next level by a local
    cat), ceil(log2 cols) levels."""
    cost, n = Cost(), cols
    while n > 1:
        cost += bit_relu(rows * (n // 2), parties, ndim=ndim)
        n -= n // 2
    return cost


# --- the head's components, as written in mpc_ft/ops.py (forward pass only) -----------------------


def linear(rows: int, d_in: int, d_out: int, parties: int, *, ndim: int = 2) -> Cost:
    """x [rows, d_in] @ secret weight [d_in, d_out] + bias: one matmul (the add is local).
    ndim: of x (3 for [B,T,D]: rows = B*T)."""
    return matmul(rows, d_in, d_out, parties, ndim=ndim)


def layer_norm(rows: int, d: int, parties: int, *, ndim: int = 2) -> Cost:
    """mpcft_normalize on [rows, d] then * gamma + beta: 2 means (public divisions of [rows]),
    square, inv_sqrt per row (NORM_SQRT_ITERS steps), centred * r (r broadcasts) and
    * gamma (secret [d])."""
    n = rows * d
    r = inv_sqrt(rows, parties, ndim=ndim, steps=NORM_SQRT_ITERS)
    return (2 * public_mul(rows, parties, ndim=ndim) + square(n, parties, ndim=ndim)
            + r + mul(n, parties, y_numel=rows, ndim=ndim)
            + mul(n, parties, y_numel=d, ndim=ndim))  # fmt: skip


def center(rows: int, d: int, parties: int, *, ndim: int = 2) -> Cost:
    """TorchOps.center on [rows, d] (the MPC-native head's norm): the mean (a public division
    of [rows]), then (x - mean) * gamma (secret [d]); + beta is local."""
    return public_mul(rows, parties, ndim=ndim) + mul(rows * d, parties, y_numel=d, ndim=ndim)


def gelu(numel: int, parties: int, *, ndim: int = 1, backward: bool = False) -> Cost:
    """MpcOps.gelu (ops.GELU_EXP): x < 0 with x * [x < 0] (compare.negative; with a backward to
    follow, its pair for slope * [x < 0] comes with the bit too), t^2, t^2 * t, three public
    multiplies and exp for E, t * E, and * 0.5."""
    return (ltz(numel, parties, ndim=ndim, products=2 if backward else 1)
            + _by_bit(numel, parties)
            + square(numel, parties, ndim=ndim) + 2 * mul(numel, parties, ndim=ndim)
            + 4 * public_mul(numel, parties, ndim=ndim)
            + exp(numel, parties, ndim=ndim))  # fmt: skip


def quad_activation(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """TorchOps.quad_activation, 0.125 x^2 + 0.25 x + 0.5: a square, two public multiplies."""
    return square(numel, parties, ndim=ndim) + 2 * public_mul(numel, parties, ndim=ndim)


def masked_softmax(rows: int, cols: int, parties: int, *, mask_rows: int = 1, ndim: int = 2
                   ) -> Cost:  # fmt: skip
    """mpcft_masked_softmax on [rows, cols], secret mask broadcasting from [mask_rows, cols]
    (the head: scores [B,H,T,T] and mask [B,1,1,T] are rows = B*H*T, mask_rows = B, ndim=4):
    (mask - 1) * 1024 (public multiply of the mask), row_max, exp, * mask, the ranged
    reciprocal of the row sums over [1, cols], * that reciprocal."""
    n, m = rows * cols, mask_rows * cols
    return (public_mul(m, parties, ndim=ndim) + row_max(rows, cols, parties, ndim=ndim)
            + exp(n, parties, ndim=ndim) + mul(n, parties, y_numel=m, ndim=ndim)
            + reciprocal_in_range(rows, parties, 1.0, float(cols), ndim=ndim)
            + mul(n, parties, y_numel=rows, ndim=ndim))  # fmt: skip


def quad_attention(b: int, heads: int, t: int, parties: int) -> Cost:
    """TorchOps.quad_attention with inv_count given: scores [b,heads,t,t], secret mask
    [b,1,1,t] and inv_count [b,1]: inv_count / c^2 (public multiply of b), (s + c)^2,
    mask * that (b*t products) and the squares times it (all 4-D)."""
    n = b * heads * t * t
    return (public_mul(b, parties, ndim=4) + square(n, parties, ndim=4)
            + mul(b * t, parties, y_numel=b, ndim=4)
            + mul(n, parties, y_numel=b * t, ndim=4))  # fmt: skip


def inverse_count(b: int, t: int, parties: int) -> Cost:
    """MpcOps.inverse_count of a secret mask [b, t]: the ranged reciprocal of the b counts over
    [1, t]. (Data owners normally share 1 / count instead: then it is free.)"""
    return reciprocal_in_range(b, parties, 1.0, float(t), ndim=2)


def masked_mean(b: int, t: int, d: int, parties: int, *, inv_count: bool = True) -> Cost:
    """TorchOps.masked_mean, h [b,t,d], secret mask [b,t]: the token weights mask * inv_count
    [b,1] (b*t products), then [b,1,t] @ h. inv_count=True: it is given (shared by the data
    owners, as the head runs); False: computed first by MpcOps.inverse_count."""
    cost = (mul(b * t, parties, y_numel=b, ndim=2)
            + matmul(1, t, d, parties, batch=b, ndim=3))  # fmt: skip
    return cost if inv_count else inverse_count(b, t, parties) + cost


def merged(*protocols: tuple[Cost, int]) -> Cost:
    """Protocols run side by side (rounds.run), each given as (its cost, its exchanges): the
    bytes and the other calls (dealer requests, folds) add up; the exchanges, one round each
    at every party, overlap: the most of them, not their sum."""
    total = sum((cost for cost, _ in protocols), Cost())
    saved = sum(n for _, n in protocols) - max(n for _, n in protocols)
    return total + _all(0, -saved)


COMPARE_EXCHANGES = compare.LEVELS + 2  # negative_steps: 7 ANDs and the B2A (carry-save: apart)


def exp_nonpositive(numel: int, parties: int, *, ndim: int = 1) -> Cost:
    """ops.exp_nonpositive: CrypTen's exp (a public division, EXP_ITERATIONS squarings) and one
    more truncation back to the tensor's bits. Its exchanges: one per squaring."""
    return exp(numel, parties, ndim=ndim) + public_mul(numel, parties, ndim=ndim)


def _softmax_parts(b: int, c: int, parties: int) -> Cost:
    """ops.softmax_parts on logits [b, c] with secret one-hot labels. General: row_max,
    exp_nonpositive, the ranged reciprocal of the b row sums over [1, c], e times it (the
    probabilities), onehot * logits. Two classes (ops.two_class_parts): the sign of l1 - l0
    with 3 bit-product pairs, exp_nonpositive on [b, 2] and onehot * logits side by side
    (`merged`), one exchange of 3 products by the bit, the reciprocal over [1, 2] and one
    product of [b, 1]."""
    n = b * c
    dot = mul(n, parties, ndim=2)
    if c == 2:
        together = merged(
            (ltz(b, parties, ndim=2, products=3), COMPARE_EXCHANGES),
            (exp_nonpositive(n, parties, ndim=2), EXP_ITERATIONS),
            (dot, 1),
        )
        return (
            together
            + open_(3 * b, parties)
            + reciprocal_in_range(b, parties, 1.0, 2.0, ndim=2)
            + mul(b, parties, ndim=2)
        )
    return (row_max(b, c, parties) + exp_nonpositive(n, parties, ndim=2)
            + reciprocal_in_range(b, parties, 1.0, float(c), ndim=2)
            + mul(n, parties, y_numel=b, ndim=2) + dot)  # fmt: skip


def cross_entropy(b: int, c: int, parties: int) -> Cost:
    """mpcft_cross_entropy on logits [b, c], secret one-hot labels: `_softmax_parts`, the
    ranged log of the b row sums over [1, c] and the batch mean (a public division of one
    element)."""
    return (_softmax_parts(b, c, parties) + log_in_range(b, parties, 1.0, float(c), ndim=2)
            + public_mul(1, parties, ndim=0))  # fmt: skip


def cross_entropy_backward(b: int, c: int, parties: int) -> Cost:
    """MpcOps.cross_entropy_backward on logits [b, c], secret one-hot labels, EXCLUDING the
    autograd backward that its `logits.backward(grad)` triggers (the tests measure it on logits
    that do not require grad, where that call does nothing; on a leaf, as in the component
    benchmark, it only stores the gradient: no communication either): `_softmax_parts` and
    p - onehot (the summed loss's gradient: no multiply). No log."""
    return _softmax_parts(b, c, parties)
