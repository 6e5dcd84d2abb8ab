"""Independent protocols whose openings share exchanges: the rounds of the longest, not the sum.

On small tensors a round costs far more than its bytes (about 1 ms, a bare exchange 0.2-0.4 ms,
against microseconds of data), so protocols that do not depend on each other should open
together. The cross-entropy of two classes (ops.py) runs a comparison (8 openings of binary
shares), an exp (8 squarings) and a product side by side: 8 rounds instead of 17.

A protocol is written as a generator of steps. Each step yields the list of this party's shares
to open, as (tensor, xor) pairs (xor: binary shares, opened by XOR; else arithmetic, by sum),
and receives the opened tensors in the same order; the generator's return value is the
protocol's result. Between yields it computes locally, and it may also talk on its own (a
3-party truncation's fold, a dealer request): every party runs the same deterministic schedule,
so those calls meet their peers' in the same order.

`run(*protocols)`, each round: collect every live protocol's pending openings, open them all in
one exchange (messages.py: one message per peer, sums and XORs together, counted as one round),
hand each protocol its part and advance it to its next step. A protocol run alone costs exactly
what it did written inline: same openings, same dealer requests, in the same order.
Security: nothing new is opened; each opened value is masked as its protocol masks it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

Opening = list[tuple[torch.Tensor, bool]]  # this party's shares to open; True: binary (XOR)
Steps = Generator[Opening, list[torch.Tensor], Any]


def open_together(opening: Opening) -> list[torch.Tensor]:
    """Open arithmetic and binary shares in one exchange (one counted round), in order."""
    import crypten.communicator as comm

    sums = [t for t, xor in opening if not xor]
    xors = [t for t, xor in opening if xor]
    # messages.all_reduce: the tensors from index len(sums) on XORed (none, or all, as may be)
    opened = comm.get().all_reduce(sums + xors, batched=True, xor_from=len(sums))
    summed, xored = iter(opened[: len(sums)]), iter(opened[len(sums) :])
    return [next(xored) if xor else next(summed) for _, xor in opening]


def run(*protocols: Steps) -> list[Any]:
    """Run the protocols side by side (module docstring); their return values, in order."""
    results: list[Any] = [None] * len(protocols)
    pending: dict[int, Opening] = {}

    def advance(i: int, opened: list[torch.Tensor] | None) -> None:
        try:
            pending[i] = protocols[i].send(opened)
        except StopIteration as done:
            pending.pop(i, None)
            results[i] = done.value

    for i in range(len(protocols)):
        advance(i, None)
    while pending:
        order = sorted(pending)
        opened = iter(open_together([part for i in order for part in pending[i]]))
        for i in order:
            advance(i, [next(opened) for _ in pending[i]])
    return results


def square_steps(x: Any) -> Steps:
    """x.square() for an arithmetic MPCTensor, as CrypTen's beaver.square and
    ArithmeticSharedTensor.square_ compute it: the dealer pair (r, r^2), one opening of x - r,
    r^2 + 2 e r + e^2 (e^2 at party 0), then the truncation (ArithmeticSharedTensor.div_)."""
    import crypten
    import crypten.communicator as comm
    from crypten.mpc import MPCTensor

    r, r2 = crypten.mpc.get_default_provider().square(x.size(), device=x.device)
    (e,) = yield [(x._tensor.share - r.share, False)]
    z = r2.share + 2 * r.share * e
    if comm.get().get_rank() == 0:
        z += e * e
    out = MPCTensor.from_shares(z, precision=x.encoder._precision_bits)
    out._tensor.div_(x.encoder.scale)
    return out


def mul_steps(x: Any, y: Any) -> Steps:
    """x * y for arithmetic MPCTensors of one shape and scale, as CrypTen's beaver.mul (with
    compat patch 9's two local products): a dealer triple, one opening of x - a and y - b, then
    the truncation."""
    import crypten
    import crypten.communicator as comm
    from crypten.mpc import MPCTensor

    from mpc_ft import products

    provider = crypten.mpc.get_default_provider()
    a, b, c = provider.generate_additive_triple(x.size(), y.size(), "mul", device=x.device)
    e, d = yield [(x._tensor.share - a.share, False), (y._tensor.share - b.share, False)]
    first = comm.get().get_rank() == 0
    z = products.beaver_shares(torch.mul, e, d, a.share, b.share, c.share, first=first)
    out = MPCTensor.from_shares(z, precision=x.encoder._precision_bits)
    out._tensor.div_(x.encoder.scale)
    return out
