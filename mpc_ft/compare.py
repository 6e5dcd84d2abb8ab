"""The sign of shared values (x < 0) from a carry-only adder on packed bits.

CrypTen's comparison (MPCTensor._ltz) converts the arithmetic shares to binary ones and adds
them with a full Kogge-Stone adder: all 64 sum bits, 13 AND-words per element (an AND of the
64-bit words, then 6 levels of ANDs on the stacked generate/propagate words), to read one bit.
The sign is the top bit of x0 + x1 = (x0 ^ x1)_63 ^ (carry into bit 63), and the carry needs
only a halving tree over the 63 lower bit positions:

1. g = x0 & x1 (one AND of n words); p = x0 ^ x1 (local). Shift both left by one, so that the
   64 positions hold bits 0..62 above an empty position: the group carry over all 64 is the
   carry into bit 63.
2. Six levels, stride s = 1, 2, 4, ..., 32. Each pairs adjacent groups (lo, hi) of every word:
   G = G_hi ^ (P_hi & G_lo), P = P_hi & P_lo (G_hi and P_hi & G_lo never both hold, so OR is
   XOR). Both ANDs go into one AND of words: (P_hi | P_hi << s) & (G_lo | P_lo << s). A level
   leaves half of each word's positions empty, so words are merged in pairs (the second
   shifted by s, disjoint bits: XOR): the level's ANDs open n / 2^k words, not 2n.
3. After the sixth level each word holds 64 carries; element i sits in word i mod W at
   position bitreverse(i div W) (the merges' order). The sign bit is p_63 ^ carry.
4. Bit to arithmetic (`bit_to_arithmetic`), CrypTen's B2A of one bit with its opening packed:
   the dealer's random bit r, shared both ways; z = bit ^ r opened as n / 64 words, not n
   (CrypTen opens a 64-bit word per bit); then bit = z + (1 - 2z) r_A, locally.

About 3n AND-words instead of 13n, and n / 64 words instead of n for the B2A, in the same 8
rounds (2 parties). With P > 2 parties the
P shares are first reduced to two operands by carry-save steps, a + b + c = (a ^ b ^ c) +
2 maj(a, b, c) with maj = ((a ^ c) & (b ^ c)) ^ c: one AND of n words and one round each, where
CrypTen sums them with full adders (13 AND-words and 7 rounds each). Everything but the ANDs
and the B2A is local bit shifting and masking of each party's binary share.
"""

from __future__ import annotations

from typing import Any

import torch

BITS = 64
LEVELS = 6  # log2(64)


def _signed(value: int) -> int:
    """A 64-bit pattern as torch's signed int64."""
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


def _lo_mask(s: int) -> int:
    """The positions p with p mod 2s < s: the low group of every pair at stride s."""
    return _signed(sum(1 << p for p in range(BITS) if p % (2 * s) < s))


def _bit_reverse(n: int, width: int = LEVELS) -> int:
    return int(f"{n:0{width}b}"[::-1], 2)


ORDER = torch.tensor([_bit_reverse(q) for q in range(BITS)])


def _and(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shares of x & y for binary shares x, y (CrypTen's AND: one dealer triple, one opening)."""
    from crypten.mpc.primitives import BinarySharedTensor

    return (BinarySharedTensor.from_shares(x) & BinarySharedTensor.from_shares(y)).share


def carry_sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Binary shares of the top bit of a + b (mod 2^64), in bit 0, for binary shares a and b of
    the same shape: the module docstring's steps 1-3, flattened and padded to 64 elements."""
    n = a.numel()
    pad = -n % BITS
    a, b = (torch.nn.functional.pad(t.reshape(-1), (0, pad)) for t in (a, b))
    g = _and(a, b)
    p = a ^ b
    top = (p >> (BITS - 1)) & 1
    G, P = g << 1, p << 1
    s = 1
    while s < BITS:
        mask = _lo_mask(s)
        g_hi, p_hi = (G >> s) & mask, (P >> s) & mask
        z = _and(p_hi ^ (p_hi << s), (G & mask) ^ ((P & mask) << s))
        G = g_hi ^ (z & mask)
        P = (z >> s) & mask
        half = G.size(0) // 2
        G = G[:half] ^ (G[half:] << s)
        P = P[:half] ^ (P[half:] << s)
        s *= 2
    carries = (G.unsqueeze(0) >> ORDER.unsqueeze(1)) & 1  # [q, W]: element q * W + w
    return (carries.reshape(-1) ^ top)[:n]


def pack(bits: torch.Tensor) -> torch.Tensor:
    """A flat 0/1 int64 tensor [n] -> ceil(n / 64) words, element i at bit i mod 64 of word
    i div 64 (disjoint bits: their sum is their OR, and cannot overflow)."""
    pad = -bits.numel() % BITS
    rows = torch.nn.functional.pad(bits, (0, pad)).reshape(-1, BITS)
    return (rows << torch.arange(BITS)).sum(1)


def unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """`pack`'s inverse: the first n bits."""
    return ((words.unsqueeze(1) >> torch.arange(BITS)) & 1).reshape(-1)[:n]


def bit_to_arithmetic(bits: Any) -> Any:
    """Step 4 for a flat BinarySharedTensor of 0/1 values: an ArithmeticSharedTensor of them
    (integers, as CrypTen's beaver.B2A_single_bit returns them; the same dealer request)."""
    import crypten
    from crypten.mpc.primitives import BinarySharedTensor

    r_arithmetic, r_binary = crypten.mpc.get_default_provider().B2A_rng(bits.size())
    masked = BinarySharedTensor.from_shares(pack((bits.share & 1) ^ r_binary.share))
    z = unpack(masked.reveal(), bits.numel())
    return r_arithmetic * (1 - 2 * z) + z


def ltz(x: Any) -> Any:
    """x < 0 for an arithmetic MPCTensor x, as CrypTen's MPCTensor._ltz returns it (a 0/1
    arithmetic sharing whose encoder has scale 1)."""
    import crypten.communicator as comm
    from crypten.encoder import FixedPointEncoder
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.ptype import ptype as Ptype

    share = x._tensor.share
    parts = [BinarySharedTensor(share, src=i) for i in range(comm.get().get_world_size())]
    while len(parts) > 2:  # carry-save: a + b + c = (a ^ b ^ c) + 2 maj(a, b, c), one AND
        a, b, c, *rest = parts
        parts = [a ^ b ^ c, (((a ^ c) & (b ^ c)) ^ c) << 1, *rest]
    bits = BinarySharedTensor.from_shares(carry_sign(parts[0].share, parts[1].share))
    arithmetic = bit_to_arithmetic(bits)  # then as CrypTen's _B2A(bits, precision, bits=1):
    arithmetic.encoder = FixedPointEncoder(precision_bits=0 if x.encoder.scale == 1 else None)
    arithmetic *= arithmetic.encoder._scale // x._tensor.encoder._scale
    result = x.shallow_copy()
    result._tensor = arithmetic
    result._tensor.share = result._tensor.share.reshape(share.size())
    result.ptype = Ptype.arithmetic
    result.encoder._scale = 1
    return result
