"""Cryptographic streams for CrypTen's generators (mpc_ft/randomness.py, compat patch 20).

The fact it fixes: torch.Generator is MT19937, so 312 of CrypTen's 64-bit ring elements (what
a party learns of another's triple share from one opening of an operand it knows) predict every
later one, however the seed was drawn."""

from __future__ import annotations

import random

import pytest
import torch

from mpc_ft import randomness
from mpc_ft.multiparty import run_multiparty


def _untemper(y: int) -> int:
    def undo_right(y: int, shift: int) -> int:
        x = y
        for _ in range(32 // shift + 1):
            x = y ^ (x >> shift)
        return x & 0xFFFFFFFF

    def undo_left(y: int, shift: int, mask: int) -> int:
        x = y
        for _ in range(32 // shift + 1):
            x = y ^ ((x << shift) & mask)
        return x & 0xFFFFFFFF

    y = undo_right(y, 18)
    y = undo_left(y, 15, 0xEFC60000)
    y = undo_left(y, 7, 0x9D2C5680)
    return undo_right(y, 11)


def _predict_mt19937(seen: list[int], count: int) -> list[int]:
    """The next `count` ring elements of an MT19937 stream from 312 consecutive ones (each is two
    32-bit outputs, high word first), by rebuilding its 624-word state."""
    words = []
    for value in seen[-312:]:
        unsigned = value + 2**63  # randint(-2**63, ...) adds its low end to the raw output
        words += [unsigned >> 32, unsigned & 0xFFFFFFFF]
    twister = random.Random()
    twister.setstate((3, tuple(_untemper(w) for w in words) + (624,), None))
    predicted = []
    for _ in range(count):
        high, low = twister.getrandbits(32), twister.getrandbits(32)
        predicted.append(((high << 32) | low) - 2**63)
    return predicted


def _crypten_ring(generator: torch.Generator, n: int) -> list[int]:
    """What crypten.common.rng.generate_random_ring_element draws (before patch 20)."""
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=generator).tolist()


def test_mt19937_is_predicted_from_312_outputs_and_a_keystream_is_not():
    seed = int.from_bytes(randomness.new_key()[:8], "big", signed=True)  # a secret seed
    mt = torch.Generator().manual_seed(seed)
    seen = _crypten_ring(mt, 312)
    assert _predict_mt19937(seen, 1000) == _crypten_ring(mt, 1000)
    stream = randomness.KeyStream(randomness.new_key())
    seen = stream.int64(312).tolist()
    assert _predict_mt19937(seen, 1000) != stream.int64(1000).tolist()


def test_holders_of_a_key_draw_the_same_values_and_a_saved_state_replays():
    key = randomness.new_key()
    a, b = randomness.KeyStream(key), randomness.KeyStream(key)
    sizes = [1, 3, 2, 100, 7, 5000, 1]  # odd sizes: each draw starts at a fresh counter block
    draws_a = [a.int64(n) for n in sizes]
    assert all(torch.equal(x, b.int64(n)) for x, n in zip(draws_a, sizes, strict=True))
    state = a.get_state()
    first = randomness.ring_elements((4, 5), generator=a)
    assert not torch.equal(first, randomness.ring_elements((4, 5), generator=a))
    a.set_state(state)
    assert torch.equal(first, randomness.ring_elements(torch.Size([4, 5]), generator=a))
    other = randomness.KeyStream(randomness.new_key())
    assert not torch.equal(other.int64(100), randomness.KeyStream(key).int64(100))
    with pytest.raises(ValueError, match="16 bytes"):
        randomness.KeyStream(b"short")


def test_draws_are_uniform_bits_and_k_bit_draws_stay_in_range():
    stream = randomness.KeyStream(randomness.new_key())
    values = randomness.ring_elements(200_000, generator=stream)
    assert values.dtype == torch.int64 and values.shape == (200_000,)
    bits = (values.unsqueeze(-1) >> torch.arange(64)) & 1
    assert (bits.float().mean(0) - 0.5).abs().max() < 0.01  # 5 sigma is 0.0056
    for k in (1, 7, 63):
        drawn = randomness.kbit_elements((50_000,), bitlength=k, generator=stream)
        assert drawn.min().item() >= 0 and drawn.max().item() < 2**k
        assert abs(drawn.float().mean().item() / (2**k - 1) - 0.5) < 0.01
    with pytest.raises(TypeError, match="MT19937"):
        randomness.ring_elements(3, generator=torch.Generator())


def _draws(rank):
    import crypten
    import crypten.common.rng as rng
    import crypten.mpc.primitives.arithmetic as arithmetic
    import crypten.mpc.primitives.binary as binary
    import crypten.mpc.provider.ttp_provider as ttp
    from crypten.mpc.provider.ttp_provider import TTPClient

    cpu = torch.device("cpu")
    streams = {kind: crypten.generators[kind][cpu] for kind in ("prev", "next", "global", "local")}
    streams["dealer"] = TTPClient.get().generator
    assert all(isinstance(s, randomness.KeyStream) for s in streams.values()), streams
    functions = (rng.generate_random_ring_element, arithmetic.generate_random_ring_element,
                 ttp.generate_random_ring_element, rng.generate_kbit_random_tensor,
                 binary.generate_kbit_random_tensor, ttp.generate_kbit_random_tensor)  # fmt: skip
    assert set(functions) == {randomness.ring_elements, randomness.kbit_elements}
    product = (crypten.cryptensor(torch.tensor([1.5, -2.0])) * crypten.cryptensor(torch.tensor(
        [4.0, 0.25]))).get_plain_text()  # fmt: skip
    return {kind: s.int64(4).tolist() for kind, s in streams.items()}, product.tolist()


def test_every_generator_of_a_party_is_a_keystream_and_the_pairs_agree():
    results = run_multiparty(_draws, parties=3)
    draws = [d for d, _ in results]
    for rank in range(3):
        assert draws[rank]["next"] == draws[(rank + 1) % 3]["prev"]
        assert draws[rank]["global"] == draws[0]["global"]
    privately = [tuple(d[kind]) for d in draws for kind in ("local", "dealer", "next")]
    assert len(set(privately)) == 9
    assert all(p == [6.0, -0.5] for _, p in results)
