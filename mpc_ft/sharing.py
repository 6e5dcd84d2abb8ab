"""Secret sharing and revealing: the only places where plaintext enters or leaves the MPC.

Protocol, run identically by every computing party (ranks from the job file, by name):
1. Handshake: all-gather of the job fingerprint (as integers, never pickled objects); any
   mismatch stops every party before data moves. Then all-gather of each party's public shape
   metadata: training and test example counts, tokens per example, feature width.
2. Each data owner, in rank order, shares its features [n,T,d], padding mask [n,T] and one-hot
   labels [n,C] with src = its rank (CrypTen's pseudo-random zero sharing plus the owner's values);
   the others pass only the public shape. The training set is the concatenation.
3. The model owner shares every head parameter the same way.
4. Every decryption goes through `Revealer`, which records what was revealed to whom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput
from mpc_ft.train import Dataset


def _all_gather_ints(values: list[int], group: Any, world_size: int) -> list[list[int]]:
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    return [g.tolist() for g in gathered]


@dataclass(frozen=True)
class PartyShapes:
    """Public per-party metadata exchanged in the handshake."""

    train: int
    test: int
    tokens: int
    width: int


def handshake(job: JobConfig, me: str, shapes: PartyShapes, comm: Any) -> list[PartyShapes]:
    """Compare fingerprints, then exchange shapes; BadInput naming the first party that differs."""
    names = [p.name for p in job.compute_parties]
    digest = bytes.fromhex(job.fingerprint())[:24]
    words = [int.from_bytes(digest[i : i + 8], "big", signed=True) for i in range(0, 24, 8)]
    fingerprints = _all_gather_ints(words, comm.main_group, len(names))
    for name, theirs in zip(names, fingerprints, strict=True):
        if theirs != words:
            raise BadInput(
                f"party {name!r} runs a different job (fingerprint mismatch with {me!r})"
            )
    rows = _all_gather_ints(
        [shapes.train, shapes.test, shapes.tokens, shapes.width], comm.main_group, len(names)
    )
    everyone = [PartyShapes(*row) for row in rows]
    owners = {p.name for p in job.data_owners}
    for name, s in zip(names, everyone, strict=True):
        if name in owners and s.train < 1:
            raise BadInput(f"data owner {name!r} has no training examples")
        if name in owners and s.tokens != job.backbone.max_tokens:
            raise BadInput(f"data owner {name!r} has {s.tokens} tokens, job says max_tokens "
                           f"{job.backbone.max_tokens}")  # fmt: skip
    widths = {s.width for name, s in zip(names, everyone, strict=True) if name in owners}
    if len(widths) != 1:
        raise BadInput(f"data owners' feature widths differ: {sorted(widths)} (same backbone?)")
    return everyone


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
    everyone: list[PartyShapes],
    rank: int,
) -> dict[str, Dataset | None]:
    """Share every owner's "train" and "test" sets; concatenate each in rank order."""
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
                )
            )
        if not pieces:
            result[part] = None
        elif len(pieces) == 1:
            result[part] = pieces[0]
        else:
            result[part] = Dataset(
                *(crypten.cat([getattr(p, f) for p in pieces], dim=0) for f in ("x", "mask", "y"))
            )
    return result


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

    def head(self, params: dict[str, Any], to: str) -> dict[str, torch.Tensor] | None:
        """Reveal the trained head to one party only (CrypTen reduces the shares to `dst`)."""
        dst = self.job.rank(to)
        opened = {name: p.get_plain_text(dst=dst) for name, p in params.items()}
        self.log.append({"what": "trained head", "to": to, "count": len(params)})
        return opened if self.rank == dst else None
