"""The sign of shared values (x < 0) from a carry-only adder on packed bits, and products by it.

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
4. Bit to arithmetic (`bit_to_arithmetic_steps`), CrypTen's B2A of one bit with its opening packed:
   the dealer's random bit r, shared both ways; z = bit ^ r opened as n / 64 words, not n
   (CrypTen opens a 64-bit word per bit); then bit = z + (1 - 2z) r_A, locally.
5. Products by the bit (`negative(x, count)`, `BitProducts`): the dealer makes r together with
   pairs (a, a r_A), so y * bit = z y + (1 - 2z) (e r_A + a r_A) opens only e = y - a (CrypTen's
   Beaver product opens y - a and bit - b). GELU's x * [x < 0] and its backward's slope * [x < 0],
   and relu, use it. Each e is masked by its own fresh a; the dealer sees names and shapes.

About 3n AND-words instead of 13n, and n / 64 words instead of n for the B2A, in the same 8
rounds (2 parties). With P > 2 parties the P shares are first reduced to two operands by
carry-save steps, a + b + c = (a ^ b ^ c) + 2 maj(a, b, c) with maj = ((a ^ c) & (b ^ c)) ^ c:
one AND of n words and one round each, where CrypTen sums them with full adders (13 AND-words
and 7 rounds each). With exactly 3 parties no AND is needed: truncation.fold first moves party
2's share, masked, to party 1 (one message, n elements), and two arithmetic shares remain.
Everything but the ANDs and the B2A is local bit shifting and masking of each party's binary
share. The ANDs and the B2A are steps of rounds.run (`negative_steps`), so another protocol's
openings can share their 8 exchanges (ops.py's two-class cross-entropy). `count_wraps` (compat
patch 15) serves CrypTen's truncation.
"""

from __future__ import annotations

from typing import Any

import torch

from mpc_ft import rounds, truncation

BITS = 64
LEVELS = 6  # log2(64)
BIT_DEALER_METHOD = "mpcft_bit_pair"  # the dealer's request (offline.dealer_class serves it)
BIT_PROVIDER_METHOD = "mpcft_bit_pair_triples"  # the parties' side (compat adds it to TTP)


def _signed(value: int) -> int:
    """A 64-bit pattern as torch's signed int64."""
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


def _lo_mask(s: int) -> int:
    """The positions p with p mod 2s < s: the low group of every pair at stride s."""
    return _signed(sum(1 << p for p in range(BITS) if p % (2 * s) < s))


def _bit_reverse(n: int, width: int = LEVELS) -> int:
    return int(f"{n:0{width}b}"[::-1], 2)


ORDER = torch.tensor([_bit_reverse(q) for q in range(BITS)])


def _and_steps(x: torch.Tensor, y: torch.Tensor) -> rounds.Steps:
    """Shares of x & y for binary shares x, y of one shape, as CrypTen's beaver.AND: a dealer
    triple (a, b, c = a & b), one opening of x ^ a and y ^ b, then
    c ^ (e & b) ^ (a & d) ^ (e & d), the last at party 0."""
    import crypten
    import crypten.communicator as comm

    provider = crypten.mpc.get_default_provider()
    a, b, c = provider.generate_binary_triple(x.size(), y.size(), device=x.device)
    e, d = yield [(x ^ a.share, True), (y ^ b.share, True)]
    z = c.share ^ (e & b.share) ^ (a.share & d)
    return z ^ (e & d) if comm.get().get_rank() == 0 else z


def carry_sign_steps(a: torch.Tensor, b: torch.Tensor) -> rounds.Steps:
    """Binary shares of the top bit of a + b (mod 2^64), in bit 0, for binary shares a and b of
    the same shape: the module docstring's steps 1-3, flattened and padded to 64 elements."""
    n = a.numel()
    pad = -n % BITS
    a, b = (torch.nn.functional.pad(t.reshape(-1), (0, pad)) for t in (a, b))
    g = yield from _and_steps(a, b)
    p = a ^ b
    top = (p >> (BITS - 1)) & 1
    G, P = g << 1, p << 1
    s = 1
    while s < BITS:
        mask = _lo_mask(s)
        g_hi, p_hi = (G >> s) & mask, (P >> s) & mask
        z = yield from _and_steps(p_hi ^ (p_hi << s), (G & mask) ^ ((P & mask) << s))
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


def bit_pair_answer(server: Any, size: torch.Size, count: int) -> torch.Tensor:
    """The dealer's side of step 5 (a method of offline.dealer_class): a random bit r shared
    both ways (as TTPServer.B2A) and `count` pairs (a, a r); party 0's shares of r and of each
    a r, flattened. Per generator the draws are r's bit, then (parties 1..) r's share, then
    per pair a and (parties 1..) the share of a r: the order of `bit_pair`."""
    r = server._get_binary_PRSS(size, bitlength=1)
    shares = [r - server._get_additive_PRSS(size, remove_rank=True)]
    for _ in range(count):
        a = server._get_additive_PRSS(size)
        shares.append(a * r - server._get_additive_PRSS(size, remove_rank=True))
    return torch.cat([s.reshape(-1) for s in shares])


def bit_pair(provider: Any, size: torch.Size, count: int, device: Any = None
             ) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The parties' side of step 5 (a method of CrypTen's TTP provider, traceable, so that
    offline.TripleCache fetches it ahead): this party's shares of r (arithmetic, then binary),
    then of the `count` masks a, then of the `count` products a r, as int64 tensors."""
    import crypten.communicator as comm
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element
    from crypten.mpc.provider.ttp_provider import TTPClient

    client = TTPClient.get()
    generator = client.get_generator(device=device)

    def draw(size: torch.Size) -> torch.Tensor:
        return generate_random_ring_element(size, generator=generator, device=device)

    r_binary = generate_kbit_random_tensor(size, bitlength=1, generator=generator, device=device)
    if comm.get().get_rank() == 0:
        flat = client.ttp_request(BIT_DEALER_METHOD, device, size, count)
        r_arithmetic, *products = (t.view(size) for t in flat.split(size.numel()))
        masks = [draw(size) for _ in range(count)]
    else:
        r_arithmetic, masks, products = draw(size), [], []
        for _ in range(count):
            masks.append(draw(size))
            products.append(draw(size))
    return (r_arithmetic, r_binary, *masks, *products)


class BitProducts:
    """Step 5: y * bit for the bit of `bit_to_arithmetic_steps(bits, count)`, up to `count`
    times, each opening only e = y - a (CrypTen's product also opens bit - b). With the bit as
    z + (1 - 2z) r (z public, r the dealer's), y bit = z y + (1 - 2z) (e r + a r), all local
    but e. A y of x's shape (flattened as the bits are); the result has y's scale (the bit is an
    integer: no truncation). Without pairs (no dealer: TFP) it is CrypTen's y * bit."""

    def __init__(self, bit: Any, z: torch.Tensor, r: torch.Tensor, pairs: list) -> None:
        self.bit, self.z, self.r, self.pairs = bit, z, r, pairs

    def times(self, y: Any) -> Any:
        return rounds.run(self.times_steps([y]))[0][0]

    def times_steps(self, ys: list) -> rounds.Steps:
        """y * bit for each y, their openings in one exchange (a step of rounds.run)."""
        if not self.pairs:
            return [y * self.bit for y in ys]
        pairs = [self.pairs.pop(0) for _ in ys]
        shares = [y._tensor.share.reshape(-1) for y in ys]
        opened = yield [(share - a, False) for share, (a, _) in zip(shares, pairs, strict=True)]
        results = []
        for y, share, e, (_, a_r) in zip(ys, shares, opened, pairs, strict=True):
            product = self.z * share + (1 - 2 * self.z) * (e * self.r + a_r)
            result = y.shallow_copy()
            result._tensor = y._tensor.shallow_copy()
            result._tensor.share = product.reshape(y.size())
            results.append(result)
        return results


def bit_to_arithmetic_steps(bits: Any, count: int = 0) -> rounds.Steps:
    """Step 4 for a flat BinarySharedTensor of 0/1 values: an ArithmeticSharedTensor of them
    (integers, as CrypTen's beaver.B2A_single_bit returns them), the opened z, this party's
    share of r and the pairs (a, a r) for `count` BitProducts (step 5; CrypTen's own B2A
    request, and no pairs, when count is 0 or there is no TTP dealer)."""
    import crypten
    from crypten.mpc.primitives import ArithmeticSharedTensor

    from mpc_ft import products

    provider = crypten.mpc.get_default_provider()
    pairs: list = []
    if count and products.dealer_correlations():
        r_share, r_binary, *rest = getattr(provider, BIT_PROVIDER_METHOD)(bits.size(), count)
        r_arithmetic = ArithmeticSharedTensor.from_shares(r_share, precision=0)
        pairs = list(zip(rest[:count], rest[count:], strict=True))
    else:
        r_arithmetic, r_binary = provider.B2A_rng(bits.size())
        r_binary = r_binary.share
    # this party's share of z = bit ^ r, packed: bit 0 of each XOR share (TFP shares r, a bit,
    # with random high bits that XOR to 0)
    (words,) = yield [(pack((bits.share ^ r_binary) & 1), True)]
    z = unpack(words, bits.numel())
    return r_arithmetic * (1 - 2 * z) + z, z, r_arithmetic.share, pairs


def count_wraps(shares: list[torch.Tensor]) -> torch.Tensor:
    """How many times the int64 sum of `shares` wraps: the true sum is the ring's sum plus that
    many 2^64 (CrypTen's crypten.common.util.count_wraps, compat patch 15, which traces the
    running sum with six comparisons and two conversions per term). Each share is split into a
    signed high and an unsigned low half, x = h 2^32 + l; then the true sum is
    H 2^32 + low with H = sum h + (sum l >> 32), and the wraps are floor((H + 2^31) / 2^32)."""
    high, low = shares[0] >> 32, shares[0] & 0xFFFFFFFF
    for x in shares[1:]:
        high += x >> 32
        low += x & 0xFFFFFFFF
    high += (low >> 32) + (1 << 31)
    return high >> 32


def ltz(x: Any) -> Any:
    """x < 0 for an arithmetic MPCTensor x, as CrypTen's MPCTensor._ltz returns it (a 0/1
    arithmetic sharing whose encoder has scale 1)."""
    return negative(x, 0)[0]


def relu(x: Any) -> Any:
    """max(x, 0) = x - x [x < 0], the product by the bit opening x only (step 5)."""
    _, by_neg = negative(x, 1)
    return x - by_neg.times(x)


def negative(x: Any, count: int) -> tuple[Any, BitProducts]:
    """[x < 0] as `ltz` returns it, and its BitProducts for `count` products y * [x < 0]."""
    return rounds.run(negative_steps(x, count))[0]


def negative_steps(x: Any, count: int) -> rounds.Steps:
    """`negative` as steps of rounds.run: its 8 openings (7 ANDs, the B2A) can share exchanges
    with another protocol's."""
    import crypten.communicator as comm
    from crypten.encoder import FixedPointEncoder
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.ptype import ptype as Ptype

    share = x._tensor.share
    parties = comm.get().get_world_size()
    if truncation.applies(share):  # two shares: party 2's folded away
        share, parties = truncation.fold(share), 2
    parts = [BinarySharedTensor(share, src=i) for i in range(parties)]
    while len(parts) > 2:  # carry-save: a + b + c = (a ^ b ^ c) + 2 maj(a, b, c), one AND
        a, b, c, *rest = parts
        parts = [a ^ b ^ c, (((a ^ c) & (b ^ c)) ^ c) << 1, *rest]
    bits = BinarySharedTensor.from_shares(
        (yield from carry_sign_steps(parts[0].share, parts[1].share))
    )
    arithmetic, z, r, pairs = yield from bit_to_arithmetic_steps(bits, count)  # as CrypTen's _B2A:
    arithmetic.encoder = FixedPointEncoder(precision_bits=0 if x.encoder.scale == 1 else None)
    arithmetic *= arithmetic.encoder._scale // x._tensor.encoder._scale
    result = x.shallow_copy()
    result._tensor = arithmetic
    result._tensor.share = result._tensor.share.reshape(share.size())
    result.ptype = Ptype.arithmetic
    result.encoder._scale = 1
    return result, BitProducts(result, z, r, pairs)
