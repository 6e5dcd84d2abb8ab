"""Triples ahead of time (offline.py): the dealer's bulk answer, and training steps that never
wait on the dealer yet compute what the plaintext twin computes."""

from __future__ import annotations

import pytest
import torch

from mpc_ft import head as head_def
from mpc_ft import offline, train
from mpc_ft.config import HeadConfig, TrainConfig
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import TorchOps

HEAD = HeadConfig(d_model=8, num_heads=2, d_ffn=16, num_blocks=1)
SGD = TrainConfig(lr=0.1, momentum=0.9)


def test_the_answer_shapes_follow_from_the_call_arguments():
    size = offline.result_size
    assert size("additive", (torch.Size([2, 3]), torch.Size([3, 4]), "matmul"), {}) == (2, 4)
    assert size("additive", (torch.Size([2, 1, 3]), torch.Size([4, 3]), "mul"), {}) == (2, 4, 3)
    assert size("binary", (torch.Size([5, 1]), torch.Size([1, 6])), {}) == (5, 6)
    for name in ("square", "wraps", "B2A"):
        assert size(name, (torch.Size([7, 2]),), {}) == (7, 2)
    with pytest.raises(ValueError, match="unknown dealer call"):
        size("mystery", (), {})


def test_a_request_whose_tuples_are_used_up_reads_as_absent():
    """CrypTen keeps a used-up request in its cache and then fails on it (pop from empty list);
    the cache offline.py installs sends it to the dealer instead."""
    cache = offline._Tuples({("square", (torch.Size([2]),)): [], ("wraps", (3,)): [1]})
    assert ("square", (torch.Size([2]),)) not in cache.keys()
    assert ("wraps", (3,)) in cache.keys() and ("other",) not in cache.keys()


def _batch(seed=0, n=4, t=5, d=6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(t) < torch.randint(2, t + 1, (n, 1), generator=g)).float()
    x = torch.randn(n, t, d, generator=g) * mask.unsqueeze(-1)
    y = torch.nn.functional.one_hot(torch.randint(0, 2, (n,), generator=g), 2).float()
    return x, mask, y


def _party(rank, params, batches, ahead):
    import crypten

    from mpc_ft import compat
    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten, triples_ahead=ahead)
    shared = {k: ops.leaf(crypten.cryptensor(v, src=0)) for k, v in params.items()}
    velocity, rounds = {}, []
    for x, mask, y in batches:
        sx, smask, sy = (crypten.cryptensor(t, src=1) for t in (x, mask, y))
        with ops.step_triples():
            before = compat.communication_stats()["rounds"]
            shared, velocity, _, _ = train.train_step(
                shared, velocity, sx, smask, sy, head=HEAD, train_cfg=SGD, ops=ops
            )
            rounds.append(compat.communication_stats()["rounds"] - before)
    fills = ops.triples.fills if ops.triples else 0
    # after the steps, the same requests again (a forward as the watchdog or evaluation would
    # run): the cache is spent, so they go to the dealer instead of failing
    with crypten.no_grad():
        head_def.forward(shared, sx, smask, HEAD, ops)
    return {k: v.get_plain_text() for k, v in shared.items()}, rounds, fills


@pytest.mark.parametrize("ahead", [True, False])
def test_steps_from_cached_triples_match_the_twin_and_skip_the_dealer(ahead):
    params = head_def.init_params(HEAD, 6, 2, seed=3)
    batches = [_batch(seed=s) for s in range(3)] + [_batch(seed=9, n=3), _batch(seed=4)]
    results = run_multiparty(_party, parties=2, args=(params, batches, ahead))
    twin = {k: TorchOps.leaf(v) for k, v in params.items()}
    velocity = {}
    for x, mask, y in batches:
        twin, velocity, _, _ = train.train_step(
            twin, velocity, x, mask, y, head=HEAD, train_cfg=SGD, ops=TorchOps
        )
    for trained, _, _ in results:
        for name, value in twin.items():
            scale = (value - params[name]).abs().max().item()
            err = (trained[name] - value.detach()).abs().max().item()
            assert err <= 0.1 * scale + 2e-4, (name, err, scale)  # a lost gradient: err = scale
    (_, first, fills), (_, second, _) = results
    if ahead:  # steps 2-5 were preceded by a fill; 2, 3 and 5 found every triple in the cache
        assert fills == 4
        assert first[0] > second[0] and first[1:3] == second[1:3] and first[4] == second[4]
        assert first[3] > second[3]  # the short batch's shapes missed: the dealer, as before
    else:
        assert fills == 0 and all(a > b for a, b in zip(first, second, strict=True))


def _seeded_party_main(*args, **kwargs):
    """multiparty's process body after torch.manual_seed(0), as `mpc-ft party` once did."""
    from mpc_ft import multiparty

    torch.manual_seed(0)
    multiparty._party_main(*args, **kwargs)


def _first_triple_draw(rank):
    import crypten
    from crypten.mpc.provider.ttp_provider import TTPClient

    crypten.cryptensor(torch.ones(2)) * crypten.cryptensor(torch.ones(2))  # a triple: linked
    return TTPClient.get().generator.int64(1).item()  # the next value of its dealer stream


def test_the_dealers_keys_are_secret_even_where_torchs_generator_is_seeded(monkeypatch):
    """CrypTen's TTPServer seeds the generator it shares with each party from torch's global
    generator: after torch.manual_seed(0) at the dealer, every session's triples were the same
    and anyone could compute every party's shares of them. The dealer's keys come from
    os.urandom (and its streams are AES-CTR, tests/test_randomness.py)."""
    from mpc_ft import multiparty

    monkeypatch.setattr(multiparty, "_party_main", _seeded_party_main)  # every process, dealer too
    first, second = (run_multiparty(_first_triple_draw, parties=2) for _ in range(2))
    assert len(set(first + second)) == 4, (first, second)
