"""Cryptographic random streams for every generator CrypTen shares (compat patch 20).

Why: CrypTen draws every share mask and every Beaver triple from a torch.Generator, which on CPU
is the Mersenne Twister MT19937. 312 consecutive 64-bit outputs give away its state, and with
it every later output, however its seed was drawn. The protocol shows parties such runs: a party
that knows an operand of a product in the clear (a data owner its features, the model owner the
initial weights) sees the opening e = x - a and holds its own share of a, so it learns the other
party's share of a, thousands of consecutive outputs of the generator that party shares with
the dealer. From then on it knows every later triple of that party, and each opening gives away
its operand: the other party's data, weights and gradients. That breaks the semi-honest model
the README states; tests/test_randomness.py predicts MT19937 from 312 outputs.

What: every generator becomes a `KeyStream`, AES-128 in counter mode under a key from os.urandom
(128 bits): each party's stream shared with the dealer (the dealer sends each party its key,
offline.py, as it sent CrypTen's seed), each pair's "prev"/"next" stream and the "global" one
(keys exchanged as CrypTen exchanges its seeds, right after them), and each party's "local" one.
A draw of n bytes takes the next ceil(n / 16) counter blocks, so two holders of a key that make
the same draws in the same order get the same values, as with CrypTen's generators, and a state
(key, next block) can be saved and restored (the dealer's roll-back, offline.py).
`ring_elements` and `kbit_elements` replace crypten.common.rng's two functions wherever CrypTen
bound them; a draw from a torch.Generator after that is refused (it would be MT19937 again).

Cost: about 1 GB/s here, as fast as torch's MT19937 randint (0.8 GB/s).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

KEY_BYTES = 16  # AES-128
_CHUNK = 1 << 20  # bytes of keystream per cipher call
_ZEROS = memoryview(bytes(_CHUNK))  # sliced without a copy


def _cipher(key: bytes, block: int) -> Any:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_tensor(key: bytes) -> torch.Tensor:
    """A key as a tensor that torch.distributed can send (two int64)."""
    return torch.frombuffer(bytearray(key), dtype=torch.int64).clone()


def tensor_key(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()


class KeyStream:
    """AES-128-CTR keystream with the part of torch.Generator's interface CrypTen uses."""

    def __init__(self, key: bytes, device: Any = "cpu") -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a KeyStream key has {KEY_BYTES} bytes, not {len(key)}")
        self.key, self.block, self.device = bytes(key), 0, torch.device(device)

    def int64(self, count: int) -> torch.Tensor:
        """The next `count` uniform int64 values of the stream (8 bytes each)."""
        nbytes = 8 * count
        blocks = -(-nbytes // 16)
        out = torch.empty(2 * blocks + 2, dtype=torch.int64)  # 16 bytes more: update_into's slack
        view = memoryview(out.numpy()).cast("B")
        cipher = _cipher(self.key, self.block)
        for start in range(0, 16 * blocks, _CHUNK):
            cipher.update_into(_ZEROS[: min(_CHUNK, 16 * blocks - start)], view[start:])
        self.block += blocks
        return out[:count]

    def get_state(self) -> tuple[bytes, int]:
        return self.key, self.block

    def set_state(self, state: tuple[bytes, int]) -> None:
        self.key, self.block = state


def _shape(size: Any) -> torch.Size:
    return torch.Size([size]) if isinstance(size, int) else torch.Size(size)


def _stream(generator: Any, device: Any) -> KeyStream:
    if generator is None:  # CrypTen's default: the party's local generator (CrypTen is loaded)
        generator = sys.modules["crypten"].generators["local"][torch.device(device or "cpu")]
    if not isinstance(generator, KeyStream):
        name = type(generator).__name__
        raise TypeError(f"a secret draw from a {name}, not a KeyStream: MT19937 is predictable "
                        "from its outputs (mpc_ft/randomness.py)")  # fmt: skip
    return generator


def ring_elements(size: Any, ring_size: int = 2**64, generator: Any = None, **kwargs: Any) -> Any:
    """crypten.common.rng.generate_random_ring_element from a KeyStream: uniform int64."""
    if ring_size != 2**64:
        raise ValueError(f"ring size {ring_size}: CrypTen and mpc_ft use 2**64")
    device = kwargs.get("device")
    shape = _shape(size)
    values = _stream(generator, device).int64(shape.numel()).reshape(shape)
    return values if device is None else values.to(device)


def kbit_elements(size: Any, bitlength: int | None = None, generator: Any = None,
                  **kwargs: Any) -> Any:  # fmt: skip
    """crypten.common.rng.generate_kbit_random_tensor from a KeyStream: uniform in
    [0, 2**bitlength), or over the whole ring without a bit length."""
    values = ring_elements(size, generator=generator, **kwargs)
    if bitlength is None or bitlength >= 64:
        return values
    return values & ((1 << bitlength) - 1)


def install() -> None:
    """Replace CrypTen's two draw functions in crypten.common.rng and in every loaded crypten
    module that imported them by name (idempotent; before anything binds them: compat)."""
    import crypten.common.rng as rng

    new = {"generate_random_ring_element": ring_elements,
           "generate_kbit_random_tensor": kbit_elements}  # fmt: skip
    original = {function: getattr(rng, function) for function in new}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "crypten" or name.startswith("crypten.")):
            continue
        for function, replacement in new.items():
            if getattr(module, function, None) is original[function]:
                setattr(module, function, replacement)
    from crypten.mpc.provider.ttp_provider import TTPClient

    TTPClient._TTPClient__TTPClient._setup_generators = receive_dealer_key


def exchange_party_keys(crypten: Any) -> None:
    """Steps, right after CrypTen's own seed exchange (crypten.init), at every computing party:
    1. draw a key for the stream shared with the next party, send it there, and receive the
       previous party's (CrypTen's "next" and "prev");
    2. party 0 draws the "global" key and sends it to all; each party draws its "local" key;
    3. every generator in crypten.generators becomes a KeyStream under its key."""
    comm = crypten.communicator.get()
    world, rank = comm.get_world_size(), comm.get_rank()
    next_key, prev_key = key_tensor(new_key()), torch.empty(KEY_BYTES // 8, dtype=torch.int64)
    sent = comm.isend(next_key, (rank + 1) % world)
    received = comm.irecv(prev_key, src=(rank - 1) % world)
    sent.wait()
    received.wait()
    global_key = comm.broadcast(key_tensor(new_key()), 0)
    keys = {"prev": tensor_key(prev_key), "next": tensor_key(next_key),
            "global": tensor_key(global_key), "local": new_key()}  # fmt: skip
    for kind, key in keys.items():
        for device in list(crypten.generators[kind]):
            crypten.generators[kind][device] = KeyStream(key, device)


def receive_dealer_key(client: Any) -> None:
    """TTPClient._setup_generators with a key: the dealer sends this party its stream's key
    (offline.Dealer._setup_generators), in place of CrypTen's 64-bit seed."""
    import crypten.communicator as comm
    import torch.distributed as dist

    key = torch.empty(KEY_BYTES // 8, dtype=torch.int64)
    dist.irecv(tensor=key, src=comm.get().get_ttp_rank(), group=client.ttp_group).wait()
    dist.barrier(group=client.ttp_group)
    client.generator = KeyStream(tensor_key(key))
    client.generator_cuda = None  # CPU only
