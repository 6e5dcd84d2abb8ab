"""Secret sharing and revealing: the only places where plaintext enters or leaves the MPC.

Protocol, run identically by every computing party (ranks from the job file, by name):
1. (Before: handshake.py has checked every party and exchanged the public shapes: example
   counts, tokens per example, feature width.)
2. Each data owner, in rank order, shares its features [n,T,d], padding mask [n,T], one-hot
   labels [n,C] and inverse token counts [n,1] (computed from its own mask) with src = its
   rank (CrypTen's pseudo-random zero sharing plus the owner's values); the others pass only
   the public shape. The training set is the concatenation.
3. The model owner shares every head parameter the same way.
4. Every decryption goes through `Revealer`, which records what was revealed to whom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput
from mpc_ft.ops import unflatten
from mpc_ft.train import Dataset


def share(crypten: Any, value: torch.Tensor | None, shape: tuple[int, ...], src: int) -> Any:
    """A CrypTensor of `shape` holding src's `value`; non-owners pass None.

    CrypTen wants a tensor from everyone; only src's is added into the shares, so the others
    give zeros of the public shape."""
    if value is None:
        value = torch.zeros(shape)
    elif tuple(value.shape) != tuple(shape):
        raise BadInput(f"shape {tuple(value.shape)} shared where the job expects {tuple(shape)}")
    return crypten.cryptensor(value, src=src)


def share_datasets(
    crypten: Any,
    job: JobConfig,
    local: dict[str, Dataset] | None,
    everyone: list[Any],
    rank: int,
    parts: tuple[str, ...] = ("train", "test"),
) -> dict[str, Dataset | None]:
    """Share every owner's "train" and "test" sets (those in `parts`; the others are None);
    concatenate each in rank order.

    `everyone`: each computing party's public counts (.train, .test) and .width, in rank order."""
    T = job.backbone.max_tokens
    C = job.num_classes
    width = next(s.width for s in everyone if s.train > 0)
    result: dict[str, Dataset | None] = {"train": None, "test": None}
    for part in parts:
        pieces = []
        for src, s in enumerate(everyone):
            n = getattr(s, part)
            if n == 0:
                continue
            mine = local[part] if (src == rank and local) else None
            pieces.append(
                Dataset(
                    x=share(crypten, mine.x if mine else None, (n, T, width), src),
                    mask=share(crypten, mine.mask if mine else None, (n, T), src),
                    y=share(crypten, mine.y if mine else None, (n, C), src),
                    # 1 / real tokens per example, from the mask its owner holds in the clear:
                    # sharing it costs nothing and saves a reciprocal per batch in MPC
                    inv_count=share(crypten, _inverse_count(mine) if mine else None, (n, 1), src),
                )
            )
        if not pieces:
            result[part] = None
        elif len(pieces) == 1:
            result[part] = pieces[0]
        else:
            result[part] = Dataset.concat(pieces, crypten.cat)
    return result


def poisson_batches(
    crypten: Any,
    job: JobConfig,
    local: dict[str, Dataset] | None,
    everyone: list[Any],
    rank: int,
    slots: tuple[int, ...],
    rate: float,
) -> Any:
    """DP training's batch source (sampling.py): every step, each data owner shares a fresh
    private Poisson sample of its training set in its public number of slots; its plaintext
    stays with it. Replaces sharing the whole training set up front (step 2 above)."""
    from mpc_ft.sampling import PoissonBatches

    width = next(s.width for s in everyone if s.train > 0)
    owners = [(src, s.train, local["train"] if (src == rank and local) else None)
              for src, s in enumerate(everyone) if s.train > 0]  # fmt: skip
    return PoissonBatches(
        owners,
        slots,
        rate,
        (job.backbone.max_tokens, width, job.num_classes),
        share=lambda value, shape, src: share(crypten, value, shape, src),
    )


def _inverse_count(data: Dataset) -> torch.Tensor:
    return data.inv_count if data.inv_count is not None else 1.0 / data.mask.sum(1, keepdim=True)


def share_head(
    crypten: Any,
    params: dict[str, torch.Tensor] | None,
    shapes: dict[str, tuple[int, ...]],
    src: int,
) -> dict[str, Any]:
    """The model owner's initial head, parameter by parameter (shapes are public)."""
    return {name: share(crypten, params[name] if params else None, shape, src)
            for name, shape in shapes.items()}  # fmt: skip


def declared_reveals(job: JobConfig, *, has_test: bool) -> list[dict[str, Any]]:
    """The job's reveal policy: every decryption a computing party takes part in, in order.

    Derived from the job file alone (plus whether any owner holds test data, which the
    handshake makes public): per-epoch aggregates (summed loss, correct count) to all, the
    test set's correct count to all, the trained head to the model owner (reveal.head). The
    dealer takes part in no reveal. `Revealer` refuses anything else."""
    from mpc_ft.head import param_shapes

    policy = [
        {"what": f"epoch {e + 1}", "to": "all", "count": 2}
        for e in range(job.train.epochs)
        if not job.dp.enabled
    ]  # under DP nothing per epoch: the accountant covers no such reveal
    if has_test:
        policy.append({"what": "test accuracy", "to": "all", "count": 1})
    if job.reveal.head == "model_owner":
        count = len(param_shapes(job.head, job.head.d_model, job.num_classes))
        policy.append({"what": "trained head", "to": job.model_owner.name, "count": count})
    return policy


def _is_watchdog(entry: dict[str, Any], job: JobConfig) -> bool:
    """The overflow watchdog's reveals (watchdog.py), declared by train.watchdog_every: every
    check opens one count to all; a failed check also opens the per-tensor flags, and a
    rollback repeats checks, so they are allowed at any point rather than listed in order."""
    return job.train.watchdog_every > 0 and entry["to"] == "all" and \
        str(entry["what"]).startswith("watchdog step ")  # fmt: skip


class UndeclaredReveal(Exception):
    """A decryption the job's reveal policy does not declare: a bug, never bad input."""


@dataclass
class Revealer:
    """The one gate through which shared values become plaintext; keeps a log of every reveal.

    With a `policy` (declared_reveals), a reveal that is not the next declared one raises
    UndeclaredReveal before anything is decrypted; every party runs the same code, so all
    stop at the same point. Values CrypTen opens inside its own protocols (masked
    differences in a Beaver multiplication, comparisons) are uniformly masked and are not
    reveals in this sense."""

    job: JobConfig
    rank: int
    policy: list[dict[str, Any]] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def scalars(self, values: list[Any], what: str) -> list[float]:
        """Reveal aggregate scalars to every computing party (one decryption for all)."""
        import crypten

        def decrypt() -> torch.Tensor:
            return crypten.stack([v.reshape(1) for v in values]).get_plain_text().reshape(-1)

        return [float(v) for v in self._open(what, "all", len(values), decrypt)]

    def tensors(self, values: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
        """Reveal named shared tensors to every computing party, in one opening (federated
        mode: the initial head, then each round's averaged update, so the global head)."""
        import crypten

        def decrypt() -> torch.Tensor:
            return crypten.cat([v.reshape(-1) for v in values.values()]).get_plain_text()

        flat = self._open(what, "all", len(values), decrypt)
        return unflatten(flat, {name: tuple(v.size()) for name, v in values.items()})

    def head(self, params: dict[str, Any], to: str) -> dict[str, torch.Tensor] | None:
        """Reveal the trained head to one party only (CrypTen reduces the shares to `dst`)."""
        dst = self.job.rank(to)

        def decrypt() -> dict[str, torch.Tensor]:
            return {name: p.get_plain_text(dst=dst) for name, p in params.items()}

        opened = self._open("trained head", to, len(params), decrypt)
        return opened if self.rank == dst else None

    def to_party(self, value: Any, to: str, what: str) -> torch.Tensor | None:
        """Reveal one shared tensor to party `to` alone (None on every other party)."""
        dst = self.job.rank(to)
        opened = self._open(what, to, value.numel(), lambda: value.get_plain_text(dst=dst))
        return opened if self.rank == dst else None

    def _open(self, what: str, to: str, count: int, decrypt: Callable[[], Any]) -> Any:
        """Every decryption in mpc_ft passes here: check it against the policy, decrypt, log."""
        entry = {"what": what, "to": to, "count": count}
        if self.policy is not None and not _is_watchdog(entry, self.job):
            done = sum(not _is_watchdog(e, self.job) for e in self.log)
            expected = self.policy[done] if done < len(self.policy) else "nothing more"
            if entry != expected:
                message = f"undeclared reveal {entry}: the job declares {expected} next"
                raise UndeclaredReveal(message)
        opened = decrypt()
        self.log.append(entry)
        return opened
