"""Differential privacy inside MPC: DP-SGD computed on shares, so the released head is
(epsilon, delta)-DP and no party ever sees an unclipped or un-noised gradient.

One DP-SGD step (the same code on TorchOps for the twin and on MpcOps under CrypTen):
1. The batch: every data owner's slots, a Poisson sample of its examples drawn in private,
   the other slots public dummies of weight 0 (sampling.py); rows and weights are shares.
2. One forward and backward pass with a copy of every parameter per clipping unit (ops.
   PerUnitOps): a unit is one example (dp.num_microbatches = 0) or a microbatch of m
   consecutive slots. Each row's loss gradient is multiplied by its weight, so a dummy
   contributes nothing -> g_j, unit j's summed gradient over all head parameters (shares).
3. |g_j|^2 on shares (C = max_grad_norm), for all units at once.
4. Clip factor on shares, f_j = min(1, C / |g_j|), by octaves (`clip_factors`): one batched
   comparison of |g_j|^2 with C^2 4^i, then Newton's inverse square root over [1, 4] within
   the octave (`inv_sqrt_in_range`: CrypTen's inv_sqrt diverges above 100 and has no autograd;
   we are outside autograd). A unit with |g_j|^2 > CLIP_RANGE C^2 gets f_j = 0: dropping it
   keeps its contribution's norm <= C, so the guarantee holds.
5. G = sum_j f_j g_j + N, N ~ N(0, (sigma S)^2) per coordinate (joint noise, below), with S
   the sensitivity: C per example; 2C per microbatch (adding one example to a microbatch can
   move its clipped sum from one point of the C-ball to the opposite one).
6. SGD (train.sgd_step) on G / train.batch_size: the expected batch size, as Opacus divides.

Joint noise: each of the P computing parties draws a Gaussian of variance (sigma S)^2 / (P - 1)
from os.urandom and secret-shares it (src = its rank); the parties add the shares. Any one party
knows its own draw; the other P - 1 draws, unknown to it, still sum to variance (sigma S)^2.
Accounting (`spend`) uses sigma, the multiplier against any single (non-colluding) party; the
total noise is sqrt(P / (P - 1)) times larger. The twin draws the same P terms in the clear.

Accounting: Opacus's RDP accountant (kept library; no formula here) for `steps` steps of the
Poisson-subsampled Gaussian mechanism at sample rate q = train.batch_size / N, which is what
sampling.py runs, plus the slot overflow's share of delta (sampling.py's module docstring).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mpc_ft import head as head_def
from mpc_ft.config import DpConfig, HeadConfig, TrainConfig
from mpc_ft.errors import BadInput
from mpc_ft.ops import PerUnitOps, unflatten, units

OCTAVES = 10  # clip_factors works by factors of 4 in |g|^2 / C^2, up to CLIP_RANGE = 4^OCTAVES
CLIP_RANGE = 4.0**OCTAVES  # largest |g|^2 / C^2 clipped exactly (2^20); beyond it a unit is dropped
# RDP orders for the accountant: Opacus's defaults stop at 63, too low for few steps at a small
# sample rate ("optimal order is the largest alpha"), which over-states epsilon
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 256, 512]
CLIP_TOL = 1e-5  # relative error of the Newton inverse square root (in exact arithmetic)
OVERFLOW_SHARE = 0.01  # of delta, for more examples drawn than an owner has slots (sampling.py)
# Rollbacks of the overflow watchdog a DP run may make (train.train). Each repeats at most
# train.watchdog_every steps, which are fresh invocations of the mechanism: the accountant counts
# ROLLBACKS * watchdog_every steps beyond the run's, whether they happen or not.
ROLLBACKS = 2


@dataclass(frozen=True)
class DpRun:
    """What a training run needs for DP: the job's settings and how many parties draw noise."""

    config: DpConfig
    parties: int  # computing parties, each drawing a share of the noise


@dataclass(frozen=True)
class PrivacySpend:
    """The accountant's answer for one training run (report.json's dp_* keys)."""

    epsilon: float
    delta: float  # the whole delta: the accountant's (1 - OVERFLOW_SHARE) plus the overflow's
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    microbatch_size: int
    slots: tuple[int, ...] = ()  # per data owner, in rank order (sampling.py)
    spare_steps: int = 0  # within `steps`: what ROLLBACKS rollbacks may repeat
    rollbacks: int = 0  # allowed
    overflow_probability: float = 0.0  # of any owner drawing more than its slots, any step
    accountant: str = "rdp (opacus)"
    sampling: str = ("poisson, drawn by each data owner in private into fixed slots padded "
                     "with dummies of secret weight 0")  # fmt: skip

    @property
    def sensitivity(self) -> float:
        """One example's largest effect on the clipped sum: C per example, 2C per microbatch."""
        return self.max_grad_norm * (1 if self.microbatch_size == 1 else 2)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- accounting (pure functions over a kept library) ---------------------------------------------


def steps_of(n: int, train_cfg: TrainConfig) -> int:
    return -(-n // train_cfg.batch_size) * train_cfg.epochs


def spend(cfg: DpConfig, counts: int | Sequence[int], train_cfg: TrainConfig) -> PrivacySpend:
    """Epsilon for cfg.noise_multiplier, or the noise multiplier calibrated to
    cfg.target_epsilon, and each data owner's slots, for owners holding `counts` examples
    (public) and train_cfg's expected batch size and epochs. The accountant gets
    (1 - OVERFLOW_SHARE) of delta; the slots are sized so that the overflow's part,
    (1 + e^epsilon) * P(any overflow), stays within the rest."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from mpc_ft.sampling import overflow_probability, slots_for

    counts = [counts] if isinstance(counts, int) else list(counts)
    n = sum(counts)
    q = min(1.0, train_cfg.batch_size / n)
    spare = ROLLBACKS * train_cfg.watchdog_every
    steps = steps_of(n, train_cfg) + spare
    m = microbatch_size(cfg, train_cfg)
    accountant_delta = cfg.delta * (1 - OVERFLOW_SHARE)
    sigma = cfg.noise_multiplier
    if cfg.target_epsilon > 0:
        sigma = get_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=accountant_delta, sample_rate=q,
            steps=steps, accountant="rdp", alphas=RDP_ORDERS,
        )  # fmt: skip
    epsilon = math.inf
    if sigma > 0:
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, steps)]
        epsilon = accountant.get_epsilon(delta=accountant_delta, alphas=RDP_ORDERS)
    blowup = 1 + math.exp(min(epsilon, 700.0))  # delta' = delta + (1 + e^eps) * P(overflow)
    per_step = OVERFLOW_SHARE * cfg.delta / (blowup * steps * len(counts))
    slots = [nk if q >= 1 else slots_for(nk, q, per_step) for nk in counts]
    slots[-1] += -sum(slots) % m  # whole microbatches
    overflow = min(1.0, steps * sum(overflow_probability(nk, q, s) for nk, s in
                                    zip(counts, slots, strict=True)))  # fmt: skip
    if sigma > 0:  # the guarantee: (epsilon, cfg.delta), both parts of delta within it
        assert accountant_delta + blowup * overflow <= cfg.delta * (1 + 1e-9), (overflow, slots)
    return PrivacySpend(
        epsilon=float(epsilon), delta=cfg.delta, noise_multiplier=float(sigma),
        max_grad_norm=cfg.max_grad_norm, sample_rate=q, steps=steps, microbatch_size=m,
        slots=tuple(slots), overflow_probability=overflow, spare_steps=spare,
        rollbacks=ROLLBACKS if spare else 0,
    )  # fmt: skip


def microbatch_size(cfg: DpConfig, train_cfg: TrainConfig) -> int:
    if cfg.num_microbatches == 0:
        return 1
    if train_cfg.batch_size % cfg.num_microbatches:
        raise BadInput(f"dp.num_microbatches {cfg.num_microbatches} must divide train.batch_size "
                       f"{train_cfg.batch_size}")  # fmt: skip
    return train_cfg.batch_size // cfg.num_microbatches


# --- the inverse square root on shares -----------------------------------------------------------


def inv_sqrt_steps(lo: float, hi: float, tol: float = CLIP_TOL) -> int:
    """Newton steps y <- y (3 - t y^2) / 2 from y0 = 1 / sqrt(hi) until |1 - y sqrt(t)| <= tol
    for every t in [lo, hi]. The error e = 1 - y sqrt(t) maps to e' = e^2 (3 - e) / 2 - ... and
    shrinks fastest near 0; the slowest t is lo (y must grow by sqrt(hi / lo), at most 1.5x per
    step while y^2 t << 1): count the steps for t = lo in float64."""
    t, y, steps = lo, 1.0 / math.sqrt(hi), 0
    while abs(1.0 - y * math.sqrt(t)) > tol:
        y = y * (3.0 - t * y * y) / 2.0
        steps += 1
        if steps > 200:
            raise ValueError(f"no convergence on [{lo}, {hi}]")
    return steps


def inv_sqrt_in_range(t: Any, lo: float, hi: float, tol: float = CLIP_TOL) -> Any:
    """1 / sqrt(t) for t known to lie in [lo, hi] (public bounds, 0 < lo < hi).

    Newton from y0 = 1 / sqrt(hi): t y0^2 <= 1 < 3, so it converges for every t in range (never
    overshooting: y stays below 1 / sqrt(t)); 3 products a step. The first step from the public
    start is local."""
    steps = inv_sqrt_steps(lo, hi, tol)
    y0 = 1.0 / math.sqrt(hi)
    y = t * (-0.5 * y0**3) + 1.5 * y0
    for _ in range(steps - 1):
        y = y * ((t * y.square()) * -0.5 + 1.5)
    return y


def _is_positive(x: Any) -> Any:
    """1 where x > 0, else 0 (one comparison on shares)."""
    bits = x > 0
    return bits.to(x.dtype) if isinstance(bits, torch.Tensor) else bits


def clip_factors(sq_norms: Any, max_grad_norm: float) -> Any:
    """sq_norms [k] (shares) -> min(1, C / norm) [k]; 0 where norm^2 > CLIP_RANGE C^2 (the unit
    is dropped, see the module docstring).

    By octaves, because 16-bit fixed point cannot run Newton over the whole range: for
    u = norm^2 / C^2 near 1e6 (reached late in the demo's DP training) the inverse square root
    is 1e-3 and its square underflows, so Newton saw nothing and the "clipped" unit was scaled UP
    (a DP run on shares overflowed at step 100). Also, no product here has a large result
    (CrypTen's truncation of a product fails with probability ~|result| 2^(2 bits - 64)).
    1. One batched comparison of norm^2 with C^2 4^j (j = 0..OCTAVES) and with CLIP_RANGE C^2.
    2. Octave j (C^2 4^j < norm^2 <= C^2 4^(j+1)) as a 0/1 share; r = norm^2 / (C^2 4^j) in
       (1, 4] (products with 0/1 shares are exact); r = 1 where norm^2 <= C^2.
    3. f = 2^-j / sqrt(r): Newton over [1, 4] times the octave's public 2^-j."""
    c2 = max_grad_norm**2
    bounds = [c2 * 4.0**j for j in range(OCTAVES + 1)]
    bits = _is_positive(_stack([sq_norms - b for b in bounds] + [-sq_norms + c2 * CLIP_RANGE]))
    above = [bits.narrow(0, j, 1).reshape(-1) for j in range(OCTAVES + 1)]  # norm^2 > bound j
    inside = bits.narrow(0, OCTAVES + 1, 1).reshape(-1)
    octave = [above[j] - above[j + 1] for j in range(OCTAVES)]
    below = above[0] * -1 + 1  # norm <= C: factor 1
    r = below + sum((sq_norms * octave[j]) * (1.0 / bounds[j]) for j in range(OCTAVES))
    y = inv_sqrt_in_range(r, 1.0, 4.0)
    # y times each 0/1 share first: CrypTen keeps those at scale 1, where 2^-j would encode as 0
    f = y * below + sum((y * octave[j]) * 2.0**-j for j in range(OCTAVES))
    return f * inside


def _stack(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    import crypten

    return crypten.stack(values)


def _cat(values: list[Any], dim: int = 0) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values, dim)
    import crypten

    return crypten.cat(values, dim=dim)


# --- joint noise ---------------------------------------------------------------------------------


def secure_gaussian(n: int) -> torch.Tensor:
    """n standard normal draws from os.urandom (Box-Muller on 53-bit uniforms), float64."""
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(2, n) >> np.uint64(11)
    u = (raw.astype(np.float64) + 0.5) / 2.0**53  # in (0, 1)
    z = np.sqrt(-2.0 * np.log(u[0])) * np.cos(2.0 * math.pi * u[1])
    return torch.from_numpy(z)


def party_std(noise_multiplier: float, max_grad_norm: float, parties: int) -> float:
    """Each party's standard deviation: any P - 1 draws sum to std noise_multiplier * C."""
    if parties < 2:
        raise ValueError("joint noise needs at least 2 computing parties")
    return noise_multiplier * max_grad_norm / math.sqrt(parties - 1)


def plain_noise(numel: int, std: float, parties: int) -> torch.Tensor:
    """The twin's noise: the same P draws as under MPC, summed in the clear. [numel]"""
    total = torch.zeros(numel, dtype=torch.float64)
    for _ in range(parties):
        total += secure_gaussian(numel) * std
    return total.float()


def joint_noise(crypten: Any, numel: int, std: float) -> Any:
    """Under MPC: every computing party shares its own draw (src = its rank); the shares are
    summed. Nobody learns the total; each knows only its own term. [numel] shares"""
    comm = crypten.communicator.get()
    rank, parties = comm.get_rank(), comm.get_world_size()
    total = None
    for src in range(parties):
        mine = secure_gaussian(numel).float() * std if src == rank else torch.zeros(numel)
        term = crypten.cryptensor(mine, src=src)
        total = term if total is None else total + term
    return total


def noise_like(params: dict[str, Any], std: float, parties: int, ops: Any) -> dict[str, Any]:
    """One joint draw for every parameter, split back into their shapes."""
    numel = sum(p.numel() for p in params.values())
    if getattr(ops, "crypten", None) is not None:
        flat = joint_noise(ops.crypten, numel, std)
    else:
        flat = plain_noise(numel, std, parties)
    return unflatten(flat, {name: tuple(p.size()) for name, p in params.items()})


# --- the DP-SGD step -----------------------------------------------------------------------------


def clipped_sum(
    params: dict[str, Any],
    x: Any,
    mask: Any,
    y: Any,
    weight: Any = None,
    *,
    head: HeadConfig,
    ops: Any,
    max_grad_norm: float,
    m: int,
    inv_count: Any = None,
) -> tuple[dict[str, Any], int]:
    """Steps 2-5 without the noise: sum_j f_j g_j per parameter over the k = rows / m units of
    m consecutive rows (weight [rows,1]: each row's 0/1 inclusion; None: all 1), and k.

    One pass for all units: k copies of every parameter (ops.PerUnitOps), so each copy's
    gradient is its unit's; then all k squared norms, clip factors and the weighted sum at once.
    """
    rows = x.size(0)
    if rows % m:
        raise ValueError(f"{rows} rows are not whole microbatches of {m}")
    k = rows // m
    leaves = {name: ops.leaf(units(p, k)) for name, p in params.items()}
    logits = head_def.forward(leaves, x, mask, head, PerUnitOps(ops, k), inv_count)
    ops.cross_entropy_backward(logits, y, weight)
    with ops.no_grad():
        flat = _cat([g.grad.reshape(k, -1) for g in leaves.values()], dim=1)  # [k, numel]
        sq = flat.square().sum(1)  # [k]
        factors = clip_factors(sq, float(max_grad_norm))
        summed = (flat * factors.reshape(-1, 1)).sum(0)  # [numel]
    return unflatten(summed, {name: tuple(p.size()) for name, p in params.items()}), k


def train_step(
    params: dict[str, Any],
    velocity: dict[str, Any],
    x: Any,
    mask: Any,
    y: Any,
    weight: Any = None,
    *,
    head: HeadConfig,
    train_cfg: TrainConfig,
    ops: Any,
    run: DpRun,
    privacy: PrivacySpend,
    inv_count: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One DP-SGD step on shares (or in the clear for the twin): new parameters and velocity."""
    from mpc_ft.train import sgd_step

    c, m = privacy.max_grad_norm, privacy.microbatch_size
    total, _ = clipped_sum(params, x, mask, y, weight, head=head, ops=ops, inv_count=inv_count,
                           max_grad_norm=c, m=m)  # fmt: skip
    if privacy.noise_multiplier > 0:
        std = party_std(privacy.noise_multiplier, privacy.sensitivity, run.parties)
        noise = noise_like(total, std, run.parties, ops)
        with ops.no_grad():
            total = {name: g + noise[name] for name, g in total.items()}
    leaves = {}
    for name, p in params.items():
        leaves[name] = ops.leaf(p)
        leaves[name].grad = total[name]
    return sgd_step(leaves, velocity, train_cfg, ops, rows=train_cfg.batch_size)


def warn_if_not_private(privacy: PrivacySpend) -> None:
    """Loudly, as Opacus does: clipping without noise gives no guarantee."""
    if not math.isfinite(privacy.epsilon):
        import warnings

        warnings.warn(
            "dp.enabled with noise_multiplier 0: gradients are clipped but not noised; "
            "the released head has NO differential-privacy guarantee (epsilon = inf)",
            stacklevel=3,
        )


def report_keys(privacy: dict[str, Any] | None) -> dict[str, Any]:
    """report.json's DP keys (None without DP): dp_epsilon, dp_delta, noise_multiplier,
    max_grad_norm, and how they were reached (sample rate, steps, each owner's slots,
    sampling, accountant).
    dp_epsilon is None under DP too when nothing is noised (epsilon infinite)."""
    p = privacy or {}
    epsilon = p.get("epsilon")

    def _finite(value: float | None) -> float | None:  # strict JSON has no inf
        return value if value is None or math.isfinite(value) else None

    return {
        "dp_epsilon": _finite(epsilon),
        "dp_delta": p.get("delta"),
        "noise_multiplier": p.get("noise_multiplier"),
        "max_grad_norm": p.get("max_grad_norm"),
        "dp_sample_rate": p.get("sample_rate"),
        "dp_steps": p.get("steps"),
        "dp_spare_steps": p.get("spare_steps"),
        "dp_microbatch_size": p.get("microbatch_size"),
        "dp_slots": list(p["slots"]) if p.get("slots") else None,
        "dp_sampling": p.get("sampling"),
        "dp_accountant": p.get("accountant"),
    }
