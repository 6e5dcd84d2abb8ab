"""One training loop for both backends: the plaintext twin (TorchOps) and MPC on shares (MpcOps).

Per step: take the batch's rows (a public, seeded order), forward, cross-entropy, backward, SGD with
momentum and weight decay. Per epoch: the summed loss and the number of correct predictions are
accumulated as (shared) scalars and revealed once, as aggregates, through `reveal_scalars`.
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

    def __len__(self) -> int:
        return self.x.size(0)


@dataclass
class History:
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: int = 0


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The public, seeded batch order of one epoch (identical on every party and in the twin)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return list(perm.split(batch_size))


def sgd_step(
    params: dict[str, Any], velocity: dict[str, Any], train: TrainConfig, ops: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """v = momentum * v + g + wd * p; p = p - lr * v (torch.optim.SGD's convention)."""
    new_params, new_velocity = {}, {}
    with ops.no_grad():
        for name, p in params.items():
            g = p.grad
            if train.weight_decay:
                g = g + p.detach() * train.weight_decay
            v = g if name not in velocity else velocity[name] * train.momentum + g
            new_velocity[name] = v
            new_params[name] = ops.leaf(p.detach() - v * train.lr)
    return new_params, new_velocity


def train(
    params: dict[str, Any],
    data: Dataset,
    *,
    head: HeadConfig,
    train_cfg: TrainConfig,
    ops: Any,
    reveal_scalars: RevealScalars,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], History]:
    """Train for train_cfg.epochs; returns the final parameters and the revealed history."""
    params = {k: ops.leaf(v) for k, v in params.items()}
    velocity: dict[str, Any] = {}
    history = History()
    n = len(data)
    for epoch in range(train_cfg.epochs):
        start = time.perf_counter()
        loss_sum, correct = ops.zero(), ops.zero()
        batches = batch_order(n, train_cfg.batch_size, train_cfg.seed, epoch)
        bar = tqdm(batches, desc=f"{ops.name} epoch {epoch + 1}/{train_cfg.epochs}",
                   unit="step", disable=not progress, leave=True)  # fmt: skip
        for index in bar:
            x, mask, y = (
                ops.rows(data.x, index),
                ops.rows(data.mask, index),
                ops.rows(data.y, index),
            )
            logits = head_def.forward(params, x, mask, head, ops)
            loss = ops.cross_entropy(logits, y)
            loss.backward()
            params, velocity = sgd_step(params, velocity, train_cfg, ops)
            with ops.no_grad():
                loss_sum = loss_sum + loss.detach() * len(index)
                correct = correct + ops.correct(logits.detach(), y)
            history.steps += 1
            if on_step:
                on_step(history.steps)
        total_loss, total_correct = reveal_scalars([loss_sum, correct], f"epoch {epoch + 1}")
        history.loss.append(total_loss / n)
        history.accuracy.append(total_correct / n)
        history.seconds.append(time.perf_counter() - start)
        if progress:
            tqdm.write(
                f"{ops.name} epoch {epoch + 1}: loss {history.loss[-1]:.4f}, "
                f"train accuracy {history.accuracy[-1]:.3f}, {history.seconds[-1]:.1f} s"
            )
    return {k: v.detach() for k, v in params.items()}, history


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
            x, mask, y = (
                ops.rows(data.x, index),
                ops.rows(data.mask, index),
                ops.rows(data.y, index),
            )
            logits = head_def.forward(params, x, mask, head, ops)
            correct = correct + ops.correct(logits, y)
    (total,) = reveal_scalars([correct], "test accuracy")
    return total / len(data)


def plaintext_reveal(values: list[Any], what: str) -> list[float]:
    """The twin's `reveal_scalars`: nothing is secret."""
    return [float(v) for v in values]
