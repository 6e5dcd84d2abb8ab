"""One training loop for both backends: the plaintext twin (TorchOps) and MPC on shares (MpcOps).

Per step: take the batch's rows (a public, seeded order), forward, the gradient of the batch's
summed cross-entropy, backward, SGD on its mean with momentum and weight decay. Per epoch: the
summed loss and the number of correct predictions are computed once over all the epoch's logits
(one log, one argmax: in MPC their rounds are paid per epoch, not per step) and revealed once,
as aggregates, through `reveal_scalars`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mpc_ft import head as head_def
from mpc_ft.config import HeadConfig, TrainConfig

# Reveals scalars (plain or shared) as floats; MPC runs route it through sharing.Revealer.
RevealScalars = Callable[[list[Any], str], list[float]]


@dataclass
class Dataset:
    """Features, padding mask and one-hot labels: plain tensors or CrypTensors."""

    x: Any  # [N,T,d]
    mask: Any  # [N,T]
    y: Any  # [N,C]
    inv_count: Any = None  # [N,1]: 1 / real tokens; its owner computes it in the clear

    @classmethod
    def counted(cls, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> Dataset:
        """Plain data with its inverse token counts."""
        return cls(x, mask, y, 1.0 / mask.sum(1, keepdim=True))

    @classmethod
    def concat(cls, parts: list[Dataset], cat: Any = torch.cat) -> Dataset:
        """The rows of every part, in order, field by field (`cat`: torch.cat, or
        crypten.cat for shares)."""
        fields = ("x", "mask", "y", "inv_count")
        return cls(*(cat([getattr(p, f) for p in parts]) for f in fields))

    def batch(self, index: torch.Tensor, ops: Any) -> tuple[Any, Any, Any, Any]:
        """The rows of `index`: x, mask, y, inv_count (None when absent)."""
        rows = [ops.rows(t, index) for t in (self.x, self.mask, self.y)]
        return (*rows, None if self.inv_count is None else ops.rows(self.inv_count, index))

    def __len__(self) -> int:
        return self.x.size(0)


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: int = 0
    privacy: dict[str, Any] | None = None  # DP mode: dp.PrivacySpend.as_dict()
    rollbacks: int = 0  # by the overflow watchdog, in the whole run


@dataclass
class TrainState:
    """Everything training needs to go on after `step` steps (shares under MPC): what
    checkpoint.py saves. `seen`: this epoch's (logits, labels, offset, total) per step so far."""

    params: dict[str, Any]
    velocity: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    history: History = field(default_factory=History)
    seen: list[tuple[Any, Any, Any, Any]] = field(default_factory=list)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The public, seeded batch order of one epoch (identical on every party and in the twin)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return list(perm.split(batch_size))


def sgd_step(
    params: dict[str, Any], velocity: dict[str, Any], train: TrainConfig, ops: Any, rows: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch.optim.SGD on the batch-mean gradient: v = momentum * v + g + wd * p; p -= lr * v.

    `p.grad` is the gradient of the batch's summed loss over `rows` examples (see
    cross_entropy_backward); the mean's 1/rows is folded into the public constant lr/rows, so
    the gradient is multiplied (and, under MPC, truncated) once. The velocity is kept times lr:
    u = momentum * u + lr * (g + wd * p); p -= u (the same update for a constant lr)."""
    new_params, new_velocity = {}, {}
    with ops.no_grad():
        for name, p in params.items():
            u = p.grad * (train.lr / rows)
            if train.weight_decay:
                u = u + p.detach() * (train.lr * train.weight_decay)
            if train.momentum and name in velocity:
                u = velocity[name] * train.momentum + u
            new_velocity[name] = u
            new_params[name] = ops.leaf(p.detach() - u)
    return new_params, new_velocity


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
    inv_count: Any = None,
) -> tuple[dict[str, Any], dict[str, Any], Any, tuple[Any, Any]]:
    """Forward, cross-entropy gradient, backward, SGD: returns the new parameters and
    velocity, the (detached) logits and the loss terms for the epoch's metrics."""
    logits = head_def.forward(params, x, mask, head, ops, inv_count)
    terms = ops.cross_entropy_backward(logits, y)
    params, velocity = sgd_step(params, velocity, train_cfg, ops, rows=x.size(0))
    return params, velocity, logits.detach(), terms


def train(
    params: dict[str, Any],
    data: Dataset,
    *,
    head: HeadConfig,
    train_cfg: TrainConfig,
    ops: Any,
    reveal_scalars: RevealScalars,
    progress: bool = False,
    on_step: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
    dp: Any = None,
) -> tuple[dict[str, Any], History]:
    """Train for train_cfg.epochs; returns the final parameters and the revealed history.

    on_step(state) runs after every step that passed the overflow watchdog (checkpoints; after
    an epoch's last step, once its metrics are revealed); `resume` continues from such a state
    (its step is the data cursor: the batch order is public), ignoring `params`. Every
    train_cfg.watchdog_every steps the parameters are checked (watchdog.py); a failed check
    rolls back to the last state that passed and retries those steps.

    dp (a dp.DpRun whose config is enabled): DP-SGD steps (dp.py) on oblivious Poisson
    batches (sampling.py): `data` is then a sampling.PoissonBatches (under MPC: the data
    owners share each step's batch), or a plain Dataset that the twin samples as one owner
    (seeded by train_cfg.seed). No per-epoch loss or
    accuracy is computed or revealed (the accountant does not cover them), and a failed
    watchdog check rolls back at most dp.ROLLBACKS times in the whole run (the accountant counts
    the steps they may repeat), then stops."""
    from mpc_ft import watchdog

    if dp is not None and not dp.config.enabled:
        dp = None
    privacy = None
    if dp is not None:
        from mpc_ft import dp as dp_lib
        from mpc_ft.sampling import PoissonBatches

        counts = data.counts if isinstance(data, PoissonBatches) else [len(data)]
        privacy = dp_lib.spend(dp.config, counts, train_cfg)
        dp_lib.warn_if_not_private(privacy)
        if not isinstance(data, PoissonBatches):
            data = PoissonBatches.plain([data], privacy.slots, privacy.sample_rate,
                                        seed=train_cfg.seed)  # fmt: skip
        elif tuple(data.slots) != privacy.slots:
            raise ValueError(f"batch slots {data.slots} differ from the accountant's")

    state = resume or TrainState({k: ops.leaf(v) for k, v in params.items()})
    n = len(data)
    per_epoch = -(-n // train_cfg.batch_size)
    total = per_epoch * train_cfg.epochs
    good, retries = _snapshot(state, ops), 0
    bar, bar_epoch, start = None, -1, time.perf_counter()
    while state.step < total:
        epoch, i = divmod(state.step, per_epoch)
        if bar is None or bar_epoch != epoch:
            batches = batch_order(n, train_cfg.batch_size, train_cfg.seed, epoch)
            bar = tqdm(
                total=per_epoch,
                initial=i,
                desc=f"{ops.name} epoch {epoch + 1}/{train_cfg.epochs}",
                unit="step",
                disable=not progress,
                leave=True,
            )
            bar_epoch = epoch
        if privacy is None:
            x, mask, y, inv_count = data.batch(batches[i], ops)
            with ops.step_triples():
                state.params, state.velocity, logits, terms = train_step(
                    state.params, state.velocity, x, mask, y, head=head, train_cfg=train_cfg,
                    ops=ops, inv_count=inv_count,
                )  # fmt: skip
            state.seen.append((logits, y, *terms))
        else:  # a fresh Poisson sample: the public batch order is not used
            x, mask, y, inv_count, weight = data.batch(ops)
            with ops.step_triples():
                state.params, state.velocity = dp_lib.train_step(
                    state.params, state.velocity, x, mask, y, weight, head=head,
                    train_cfg=train_cfg, ops=ops, run=dp, privacy=privacy, inv_count=inv_count,
                )  # fmt: skip
        state.step += 1
        state.history.steps = state.step
        state.history.privacy = privacy.as_dict() if privacy else None
        bar.update(1)
        every = train_cfg.watchdog_every
        if every and (state.step % every == 0 or state.step == total):
            bad = watchdog.out_of_range(state.params, ops, reveal_scalars, state.step)
            if bad:
                retries += 1
                rollbacks = state.history.rollbacks + 1
                over_budget = privacy is not None and rollbacks > privacy.rollbacks
                if retries > watchdog.MAX_RETRIES or over_budget:
                    raise watchdog.Overflow(watchdog.advice(bad, state.step, retries - 1))
                tqdm.write(f"{ops.name}: overflow in {', '.join(bad)} at step {state.step}; "
                           f"rolling back to step {good.step} and retrying")  # fmt: skip
                state, bar = _snapshot(good, ops), None
                state.history.rollbacks = rollbacks
                continue
            good, retries = _snapshot(state, ops), 0
        if state.step % per_epoch:
            if on_step:
                on_step(state)
            continue
        history = state.history  # the epoch's metrics, batched: one log and one argmax per epoch
        if privacy is None:  # under DP nothing data-dependent beyond the accounted steps
            with ops.no_grad():
                logits, labels, offsets, totals = (list(c) for c in zip(*state.seen, strict=True))
                loss_sum = ops.loss_sum(offsets, totals, labels[0].size(-1))
                correct = ops.correct(ops.cat(logits), ops.cat(labels))
            total_loss, total_correct = reveal_scalars([loss_sum, correct], f"epoch {epoch + 1}")
            state.seen = []
            history.loss.append(total_loss / n)
            history.accuracy.append(total_correct / n)
        history.seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        if every:
            good = _snapshot(state, ops)
        if on_step:
            on_step(state)
        if progress and privacy is None:
            tqdm.write(
                f"{ops.name} epoch {epoch + 1}: loss {history.loss[-1]:.4f}, "
                f"train accuracy {history.accuracy[-1]:.3f}, {history.seconds[-1]:.1f} s"
            )
    return {k: v.detach() for k, v in state.params.items()}, state.history


def _snapshot(state: TrainState, ops: Any) -> TrainState:
    """A copy to roll back to: fresh leaves for the parameters (no gradient, no graph)."""
    return TrainState(
        params={k: ops.leaf(v) for k, v in state.params.items()},
        velocity=dict(state.velocity),
        step=state.step,
        history=History(
            *(list(v) if isinstance(v, list) else v for v in vars(state.history).values())
        ),  # fmt: skip
        seen=list(state.seen),
    )


def evaluate(
    params: dict[str, Any],
    data: Dataset,
    *,
    head: HeadConfig,
    batch_size: int,
    ops: Any,
    reveal_scalars: RevealScalars,
    progress: bool = False,
) -> float:
    """Accuracy on `data`; only the number of correct predictions is revealed."""
    correct = ops.zero()
    batches = list(torch.arange(len(data)).split(batch_size))
    with ops.no_grad():
        for index in tqdm(batches, desc=f"{ops.name} evaluation", disable=not progress):
            x, mask, y, inv_count = data.batch(index, ops)
            logits = head_def.forward(params, x, mask, head, ops, inv_count)
            correct = correct + ops.correct(logits, y)
    (total,) = reveal_scalars([correct], "test accuracy")
    return total / len(data)


def plaintext_reveal(values: list[Any], what: str) -> list[float]:
    """The twin's `reveal_scalars`: nothing is secret."""
    return [float(v) for v in values]
