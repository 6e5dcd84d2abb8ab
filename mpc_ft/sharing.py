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

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput
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
) -> dict[str, Dataset | None]:
    """Share every owner's "train" and "test" sets; concatenate each in rank order.

    `everyone`: each computing party's public counts (.train, .test) and .width, in rank order."""
    T = job.backbone.max_tokens
    C = job.num_classes
    width = next(s.width for s in everyone if s.train > 0)
    result: dict[str, Dataset | None] = {}
    for part in ("train", "test"):
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
            fields = ("x", "mask", "y", "inv_count")
            result[part] = Dataset(*(crypten.cat([getattr(p, f) for p in pieces]) for f in fields))
    return result


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


@dataclass
class Revealer:
    """The one gate through which shared values become plaintext; keeps a log of every reveal."""

    job: JobConfig
    rank: int
    log: list[dict[str, Any]] = field(default_factory=list)

    def scalars(self, values: list[Any], what: str) -> list[float]:
        """Reveal aggregate scalars to every computing party."""
        import crypten

        opened = crypten.stack([v.reshape(1) for v in values]).get_plain_text().reshape(-1)
        self.log.append({"what": what, "to": "all", "count": len(values)})
        return [float(v) for v in opened]

    def tensors(self, values: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
        """Reveal named shared tensors to every computing party, in one opening (federated
        mode: the initial head, then each round's averaged update, so the global head)."""
        import crypten

        flat = crypten.cat([v.reshape(-1) for v in values.values()]).get_plain_text()
        self.log.append({"what": what, "to": "all", "count": len(values)})
        sizes = [math.prod(v.size()) for v in values.values()]
        pieces = flat.split(sizes)
        return {name: piece.reshape(tuple(v.size()))
                for (name, v), piece in zip(values.items(), pieces, strict=True)}  # fmt: skip

    def head(self, params: dict[str, Any], to: str) -> dict[str, torch.Tensor] | None:
        """Reveal the trained head to one party only (CrypTen reduces the shares to `dst`)."""
        dst = self.job.rank(to)
        opened = {name: p.get_plain_text(dst=dst) for name, p in params.items()}
        self.log.append({"what": "trained head", "to": to, "count": len(params)})
        return opened if self.rank == dst else None
