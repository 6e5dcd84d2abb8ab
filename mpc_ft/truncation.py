"""Truncation of fixed-point shares: by shifts with two parties (compat patch 17), and with three
computing parties without CrypTen's wrap count (compat patch 16).

A product of two fixed-point values carries twice the fractional bits, so its shares are divided
by the scale. With two parties CrypTen does that locally (SecureML's trick): each party divides
its own share, and the sum is right to within one unit unless the two shares' signed sum wraps,
which has probability about |x| 2^-63 because one share is uniformly random. With three or more
parties local division fails (three uniform shares wrap most of the time), and CrypTen runs a
wrap-count protocol instead: a dealer pair (r, wraps of r's shares), count_wraps at every party,
a gather of x + r at party 0 and count_wraps there. That was about half of a 3-party step.

With exactly three parties `truncate` turns the three shares into two, then divides as two
parties do. Steps, for shares x0, x1, x2 of x:
1. Parties 0 and 2 draw the same uniform s from the generator they already share (CrypTen's
   pairwise seeds: party 0's "prev" is party 2's "next"); nobody else can compute s. It does
   not depend on data, so with triples ahead both draw a step's masks in its offline phase.
2. Party 2 sends x2 - s to party 1, and its own share becomes 0.
3. Party 0's share becomes x0 + s; party 1's becomes x1 + (x2 - s). They still sum to x, and
   party 0's share is uniform, as one share of a 2-party sharing is.
4. Every party divides its share locally, as two parties do (`divide`).

What each party learns: party 1 receives x2 - s, which to it is uniform and independent of x,
since s comes from a seed only parties 0 and 2 hold; parties 0 and 2 receive nothing. That is
secure for semi-honest parties that do not collude, the project's threat model. It gives up
something beyond it: afterwards parties 0 and 1 together hold x, where three additive shares
needed all three parties to pool theirs. With three parties, colluding pairs are then no better
kept out than with two (README, Threat model).

Cost: one message of n elements from party 2 to party 1 (CrypTen's: 2n into party 0, a dealer
pair for party 0 and four count_wraps), and party 0 never waits. Error: as with two parties
(`divide`), one unit at most and unbiased (tests/test_truncation.py), and a wild value with
probability about |x| 2^-63 per element (CrypTen's protocol ignores the wrap of x + r: about
|x| 2^-64).
Other party counts keep CrypTen's protocol. The divisor may be any positive integer or integer
tensor, as CrypTen's.

Steps 1-3 alone (`fold`) also start compare.py's sign with three parties: its carry circuit
then adds two shares, not three.

Local division (`divide`, two shares: two parties, or three after the fold). CrypTen divides
each share rounding toward zero, an int64 division: about 2 ns per element here, 7 ms of a
2-party native step. By a power of two 2^k, k > 0, each party shifts its share right instead
(floor, 0.2 ns per element) and party 0 adds 1. For shares a + b = X (in units of 2^k),
floor(a) + floor(b) is floor(X) - 1 with probability 1 - frac(X) and floor(X) otherwise, so with
the 1 the result is floor(X) + 1 with probability 1 - frac(X) and floor(X) with probability
frac(X): X rounded stochastically, unbiased, one unit at most (CrypTen's rule: up to two), and
X + 1 exactly when 2^k divides both shares (probability 2^-k). A wrap of the shares' signed sum
makes a wild value just as before. Other divisors keep CrypTen's rounding toward zero.
"""

from __future__ import annotations

from typing import Any

import torch

PARTIES = 3  # the party count this protocol serves; others keep CrypTen's
SENDER, RECEIVER = 2, 1  # party 2 folds its share into party 1's
PROVIDER_METHOD = "mpcft_fold_mask"  # step 1's mask, drawn ahead with a step's triples


def fold_mask(provider: Any, size: torch.Size, device: Any = None) -> torch.Tensor:
    """Step 1's s for party 0 or 2, from the generator the two share (a method of every CrypTen
    tuple provider, traceable: offline.TripleCache draws a step's masks before it, with its
    triples, at both parties in the same order)."""
    import crypten
    import crypten.communicator as comm
    from crypten.common.rng import generate_random_ring_element

    device = torch.device("cpu") if device is None else torch.device(device)
    pair = "prev" if comm.get().get_rank() == 0 else "next"  # party 0's prev is party 2's next
    return generate_random_ring_element(size, generator=crypten.generators[pair][device],
                                        device=device)  # fmt: skip


def applies(share: torch.Tensor) -> bool:
    """Whether `fold` (and so `truncate`'s protocol) serves this share: exactly three parties
    and something to send."""
    import crypten.communicator as comm

    return comm.get().get_world_size() == PARTIES and share.numel() > 0


def fold(share: torch.Tensor) -> torch.Tensor:
    """Steps 1-3 (module docstring): this party's share of the same value held by parties 0 and 1
    alone (party 2's becomes 0), for exactly three parties. Also compare.negative's first step
    with three parties: the sign of a two-share sum needs no carry-save step."""
    import crypten
    import crypten.communicator as comm

    channel = comm.get()
    rank = channel.get_rank()
    if rank == RECEIVER:
        received = torch.empty(share.size(), dtype=share.dtype, device=share.device)
        return share + channel.recv(received, SENDER)
    provider = crypten.mpc.get_default_provider()
    mask = getattr(provider, PROVIDER_METHOD)(share.size(), device=share.device)
    if rank == 0:
        return share + mask
    channel.send((share - mask).contiguous(), RECEIVER)
    return torch.zeros_like(share)


def power_of_two(divisor: Any) -> int | None:
    """k if the public `divisor` is the integer 2^k (an int, or a float CrypTen would take as
    one), else None."""
    if isinstance(divisor, float) and divisor.is_integer():
        divisor = int(divisor)
    if isinstance(divisor, int) and not isinstance(divisor, bool) and divisor > 0:
        if divisor & (divisor - 1) == 0:
            return divisor.bit_length() - 1
    return None


def divide(share: torch.Tensor, divisor: Any) -> torch.Tensor:
    """This party's share of x / divisor, for x shared between two parties (or three after
    `fold`), as a new tensor (module docstring, "Local division")."""
    import crypten.communicator as comm

    k = power_of_two(divisor)
    if k is None:
        return share.div(divisor, rounding_mode="trunc")
    out = share >> k
    if k and comm.get().get_rank() == 0:
        out += 1
    return out


def truncate(x: Any, divisor: Any, fallback: Any) -> Any:
    """Divide the ArithmeticSharedTensor `x` in place by the public integer `divisor` (module
    docstring); with a party count other than three, `fallback(x, divisor)` (CrypTen's)."""
    if not applies(x.share):
        return fallback(x, divisor)
    x.share = divide(fold(x.share), divisor)
    return x


def divide_by_shifts() -> None:
    """Patch 17: ArithmeticSharedTensor.div_ with two parties and a power-of-two divisor by
    `divide` (module docstring); other cases as CrypTen's (validation mode is refused in
    compat)."""
    import crypten.communicator as comm
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor as cls

    if getattr(cls, "_mpcft_shifts", False):
        return
    original = cls.div_

    def div_(self: Any, y: Any) -> Any:
        if comm.get().get_world_size() == 2 and power_of_two(y) is not None:
            self.share = divide(self.share, y)
            return self
        return original(self, y)

    cls.div_ = div_
    cls._mpcft_shifts = True


def install() -> None:
    """Patch 16: CrypTen's beaver.truncate (used by ArithmeticSharedTensor.div_ with 3+
    parties) by `truncate`, which keeps CrypTen's for other party counts; every tuple provider
    gains `fold_mask`, traceable. Patch 17: `divide_by_shifts`."""
    divide_by_shifts()
    from crypten.mpc.primitives import beaver
    from crypten.mpc.provider.provider import TupleProvider

    if PROVIDER_METHOD not in TupleProvider.TRACEABLE_FUNCTIONS:
        TupleProvider.TRACEABLE_FUNCTIONS.append(PROVIDER_METHOD)
        setattr(TupleProvider, PROVIDER_METHOD, fold_mask)
    original = beaver.truncate
    if getattr(original, "_mpcft_truncate", False):
        return

    def patched(x: Any, y: Any) -> Any:
        return truncate(x, y, original)

    patched._mpcft_truncate = True  # type: ignore[attr-defined]
    beaver.truncate = patched
