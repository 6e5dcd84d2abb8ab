"""Differential privacy inside MPC: DP-SGD computed on shares, so the released head is
(epsilon, delta)-DP and no party ever sees an unclipped or un-noised gradient.

One DP-SGD step (the same code on TorchOps for the twin and on MpcOps under CrypTen):
1. Split the batch (a public, seeded order) into microbatches of m consecutive rows
   (dp.num_microbatches per batch as in TF Privacy; 0: m = 1, per-example clipping).
2. Per microbatch j: forward and backward on fresh leaves -> g_j, the gradient of the
   microbatch's summed loss over all head parameters (shares).
3. u_j = |g_j|^2 / (C m_j)^2 on shares (C = max_grad_norm), for all microbatches at once.
4. Clip factor on shares: f_j = min(1, 1/sqrt(u_j)) = inv_sqrt(max(u_j, 1)), the inverse square
   root by Newton steps from a public start over the public range [1, CLIP_RANGE]
   (`inv_sqrt_in_range`: CrypTen's inv_sqrt diverges above 100 and has no autograd; we are
   outside autograd). The max and the range test are one batched comparison. A microbatch with
   u_j > CLIP_RANGE (gradient norm above sqrt(CLIP_RANGE) C m_j) gets f_j = 0: dropping it
   keeps its contribution's norm <= C, so the guarantee holds.
5. G = sum_j g_j (m / m_j) f_j + m N: m times the sum of the clipped microbatch-mean gradients
   plus m times the joint noise N ~ N(0, sigma^2 C^2) per coordinate (see `joint_noise`).
6. SGD (train.sgd_step) on G with rows = k m: the mean over the k microbatches, as TF Privacy's
   DP optimizers take it (for m = 1: Opacus's per-sample clipping, summed, noised, / B).

Joint noise: each of the P computing parties draws a Gaussian of variance (sigma C)^2 / (P - 1)
from os.urandom and secret-shares it (src = its rank); the parties add the shares. Any one party
knows its own draw; the other P - 1 draws, unknown to it, still sum to variance (sigma C)^2.
Accounting (`spend`) uses sigma, the multiplier against any single (non-colluding) party; the
total noise is sqrt(P / (P - 1)) times larger. The twin draws the same P terms in the clear.

Accounting: Opacus's RDP accountant (kept library; no formula here) for `steps` steps of the
subsampled Gaussian mechanism at sample rate q = batch_size / N. It assumes Poisson sampling;
the loop uses a seeded shuffle into fixed-size batches, which is treated as Poisson sampling (the
common practice, which can under-state epsilon; README "Differential privacy").
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mpc_ft import head as head_def
from mpc_ft.config import DpConfig, HeadConfig, TrainConfig
from mpc_ft.errors import BadInput

CLIP_RANGE = 2.0**20  # largest |g|^2 / (C m)^2 clipped exactly; beyond it a microbatch is dropped
# RDP orders for the accountant: Opacus's defaults stop at 63, too low for few steps at a small
# sample rate ("optimal order is the largest alpha"), which over-states epsilon
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 256, 512]
CLIP_TOL = 1e-3  # relative error of the Newton inverse square root (in exact arithmetic)


@dataclass(frozen=True)
class DpRun:
    """What a training run needs for DP: the job's settings and how many parties draw noise."""

    config: DpConfig
    parties: int  # computing parties, each drawing a share of the noise


@dataclass(frozen=True)
class PrivacySpend:
    """The accountant's answer for one training run (report.json's dp_* keys)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    microbatch_size: int
    # Against an adversary who knows the batch order (its seed is in the job file): no
    # amplification by sampling; each example is in exactly `epochs` steps, so the same
    # accountant over `epochs` steps at sample rate 1
    epsilon_public_order: float = math.inf
    accountant: str = "rdp (opacus)"
    sampling: str = "shuffled fixed-size batches, accounted as Poisson sampling"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- accounting (pure functions over a kept library) ---------------------------------------------


def steps_of(n: int, train_cfg: TrainConfig) -> int:
    return -(-n // train_cfg.batch_size) * train_cfg.epochs


def spend(cfg: DpConfig, n: int, train_cfg: TrainConfig) -> PrivacySpend:
    """Epsilon for cfg.noise_multiplier, or the noise multiplier calibrated to
    cfg.target_epsilon, for n training examples and train_cfg's batches and epochs."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    q = min(1.0, train_cfg.batch_size / n)
    steps = steps_of(n, train_cfg)
    sigma = cfg.noise_multiplier
    if cfg.target_epsilon > 0:
        sigma = get_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, sample_rate=q,
            steps=steps, accountant="rdp", alphas=RDP_ORDERS,
        )  # fmt: skip
    epsilon = public_order = math.inf
    if sigma > 0:
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, steps)]
        epsilon = accountant.get_epsilon(delta=cfg.delta, alphas=RDP_ORDERS)
        accountant.history = [(sigma, 1.0, train_cfg.epochs)]
        public_order = accountant.get_epsilon(delta=cfg.delta, alphas=RDP_ORDERS)
    return PrivacySpend(
        epsilon=float(epsilon), delta=cfg.delta, noise_multiplier=float(sigma),
        max_grad_norm=cfg.max_grad_norm, sample_rate=q, steps=steps,
        microbatch_size=microbatch_size(cfg, train_cfg), epsilon_public_order=float(public_order),
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


def clip_factors(sq_norms: Any, bounds_sq: torch.Tensor) -> Any:
    """sq_norms [k] (shares), bounds_sq [k] (public (C m_j)^2) -> min(1, bound / norm) [k];
    0 where norm^2 > CLIP_RANGE bound^2 (the microbatch is dropped, see the module docstring)."""
    u = sq_norms * (1.0 / bounds_sq)
    bits = _is_positive(_stack([u - 1.0, u * -1.0 + CLIP_RANGE]))  # one batched comparison
    over, inside = bits.narrow(0, 0, 1).reshape(-1), bits.narrow(0, 1, 1).reshape(-1)
    t = (u - 1.0) * over + 1.0  # max(u, 1)
    t = t * inside + (inside * -1.0 + 1.0) * CLIP_RANGE  # in [1, CLIP_RANGE] (no t - 2^20)
    return inv_sqrt_in_range(t, 1.0, CLIP_RANGE) * inside


def _stack(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    import crypten

    return crypten.stack(values)


def _cat(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    import crypten

    return crypten.cat(values)


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
    out, offset = {}, 0
    for name, p in params.items():
        out[name] = flat.narrow(0, offset, p.numel()).reshape(p.size())
        offset += p.numel()
    return out


# --- the DP-SGD step -----------------------------------------------------------------------------


def clipped_sum(
    params: dict[str, Any],
    x: Any,
    mask: Any,
    y: Any,
    *,
    head: HeadConfig,
    ops: Any,
    max_grad_norm: float,
    m: int,
    inv_count: Any = None,
) -> tuple[dict[str, Any], int]:
    """Steps 1-5 without the noise: sum_j g_j (m / m_j) f_j per parameter, and the number k of
    microbatches (m consecutive rows each; the last may be shorter)."""
    rows = x.size(0)
    starts = list(range(0, rows, m))
    sizes = [min(m, rows - s) for s in starts]
    grads: list[dict[str, Any]] = []
    for start, size in zip(starts, sizes, strict=True):
        leaves = {k: ops.leaf(v) for k, v in params.items()}
        part = [t.narrow(0, start, size) for t in (x, mask, y)]
        inv = None if inv_count is None else inv_count.narrow(0, start, size)
        logits = head_def.forward(leaves, part[0], part[1], head, ops, inv)
        ops.cross_entropy_backward(logits, part[2])
        grads.append({k: v.grad for k, v in leaves.items()})
    names = list(params)
    with ops.no_grad():  # all microbatches at once: one square and one product of shares
        flat = _stack([_cat([gj[n].reshape(-1) for n in names]) for gj in grads])  # [k, numel]
        sq = flat.square().sum(1)  # [k]
        bounds_sq = torch.tensor([(max_grad_norm * s) ** 2 for s in sizes])
        factors = clip_factors(sq, bounds_sq) * torch.tensor([m / s for s in sizes])  # [k]
        summed = (flat * factors.reshape(-1, 1)).sum(0)  # [numel]
    total, offset = {}, 0
    for n in names:
        total[n] = summed.narrow(0, offset, params[n].numel()).reshape(params[n].size())
        offset += params[n].numel()
    return total, len(sizes)


def train_step(
    params: dict[str, Any],
    velocity: dict[str, Any],
    x: Any,
    mask: Any,
    y: Any,
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

    m = privacy.microbatch_size
    c = privacy.max_grad_norm
    total, k = clipped_sum(
        params, x, mask, y, head=head, ops=ops, max_grad_norm=c, m=m, inv_count=inv_count
    )
    if privacy.noise_multiplier > 0:
        std = party_std(privacy.noise_multiplier, privacy.max_grad_norm, run.parties) * m
        noise = noise_like(total, std, run.parties, ops)
        with ops.no_grad():
            total = {name: g + noise[name] for name, g in total.items()}
    leaves = {}
    for name, p in params.items():
        leaves[name] = ops.leaf(p)
        leaves[name].grad = total[name]
    return sgd_step(leaves, velocity, train_cfg, ops, rows=k * m)


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
    max_grad_norm, and how they were reached (sample rate, steps, sampling, accountant).
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
        "dp_epsilon_public_order": _finite(p.get("epsilon_public_order")),
        "dp_sample_rate": p.get("sample_rate"),
        "dp_steps": p.get("steps"),
        "dp_microbatch_size": p.get("microbatch_size"),
        "dp_sampling": p.get("sampling"),
        "dp_accountant": p.get("accountant"),
    }
