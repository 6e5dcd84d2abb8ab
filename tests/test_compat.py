"""The CrypTen compatibility patches (mpc_ft/compat.py), one test each."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mpc_ft import compat, messages
from mpc_ft.multiparty import free_port, run_multiparty


def test_import_crypten_works_on_this_torch():
    crypten = compat.import_crypten()
    assert crypten.__version__ == "0.4.1"
    assert "torch.onnx._internal.registration" in sys.modules  # the stub, or torch's own module


def test_stub_is_needed_without_it():
    """Patch 1 pins a real incompatibility: a bare import fails on this torch."""
    code = "import crypten"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode == 0:
        pytest.skip("this torch still has torch.onnx._internal.registration: stub not needed")
    assert "registration" in proc.stderr


@pytest.mark.parametrize(
    ("ep", "message"),
    [
        (compat.PartyEndpoint(0, 1, "tcp://127.0.0.1:1"), "at least 2"),
        (compat.PartyEndpoint(2, 2, "tcp://127.0.0.1:1"), "out of range"),
        (compat.PartyEndpoint(0, 2, "127.0.0.1:1"), "URL"),
        (compat.PartyEndpoint(0, 2, "tcp://127.0.0.1:1", provider="HE"), "provider"),
    ],
)
def test_endpoint_is_checked_before_anything_starts(ep, message):
    with pytest.raises(ValueError, match=message):
        compat.init_party(ep)


def test_insecure_provider_warns(monkeypatch):
    crypten = compat.import_crypten()
    for key in ("RENDEZVOUS", "WORLD_SIZE", "RANK", "DISTRIBUTED_BACKEND"):
        monkeypatch.setenv(key, "unset")
    before = crypten.cfg.mpc.provider
    try:
        with pytest.warns(UserWarning, match="INSECURE"):
            compat._configure(crypten, compat.PartyEndpoint(0, 2, "tcp://x:1", provider="TFP"))
    finally:
        crypten.cfg.mpc.provider = before


def test_a_missing_peer_fails_within_the_timeout_instead_of_30_minutes():
    """Patch 2 and 3: explicit rendezvous and a finite gloo timeout."""
    code = textwrap.dedent(f"""
        from mpc_ft import compat, messages
        compat.init_party(compat.PartyEndpoint(0, 2, "tcp://127.0.0.1:{free_port()}",
                                               timeout_s=3))
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60


def _multiply_party(rank):
    import crypten

    x = crypten.cryptensor(torch.ones(10))
    compat.reset_communication_stats()
    (x * x).get_plain_text()
    return compat.communication_stats()


def test_communication_stats_are_recorded():
    from mpc_ft.multiparty import run_multiparty

    stats = run_multiparty(_multiply_party, parties=2)
    assert all(s["bytes"] > 0 and s["rounds"] > 0 for s in stats)


def test_without_crypten_the_cli_gives_a_one_line_hint_and_heads_still_load():
    code = textwrap.dedent("""
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "crypten" else real(name, *a)
        import mpc_ft.head  # a trained head loads without CrypTen
        from mpc_ft.cli import main
        sys.exit(main(["party", "--job", "parties/two_parties.toml", "--party", "dealer"]))
    """)
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CrypTen is not installed" in lines[0]


def _opens_with_latency(rank, n, delay):
    import crypten
    from crypten.communicator.distributed_communicator import DistributedCommunicator as comm_cls

    x = crypten.cryptensor(torch.ones(10))

    def opens():
        start = time.perf_counter()
        for _ in range(n):
            x.get_plain_text()  # one all_reduce: one CrypTen round
        return time.perf_counter() - start

    plain = min(opens() for _ in range(3))
    original = comm_cls.all_reduce
    compat.reset_communication_stats()
    with compat.emulate_latency(delay) as calls:
        delayed = opens()
    rounds = compat.communication_stats()["rounds"]
    return plain, delayed, rounds, calls, comm_cls.all_reduce is original


def test_emulated_latency_is_added_once_per_round_and_removed_after():
    from mpc_ft.multiparty import run_multiparty

    n, delay = 10, 0.1
    for plain, delayed, rounds, calls, restored in run_multiparty(
        _opens_with_latency, parties=2, args=(n, delay)
    ):
        assert rounds == n and [c[:2] for c in calls] == [("all_reduce", 2 * 10 * 8)] * n
        assert delayed >= n * delay  # every round slept
        assert delayed - plain >= 0.9 * n * delay  # ... and the sleeps were not hidden
        assert delayed - plain < 1.9 * n * delay  # once per round, not twice or per message
        assert restored
    with pytest.raises(ValueError, match="negative"), compat.emulate_latency(-1):
        pass


def test_fast_config_reads_overrides_and_sets_like_crypten():
    """Patch 5: same values as CrypTen's OmegaConf tree; overrides set and restore."""
    from omegaconf import OmegaConf

    crypten = compat.import_crypten()
    compat._fast_config(crypten)
    cfg = crypten.cfg

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    fresh = type(cfg)()  # CrypTen's defaults, read through the patched class
    tree = OmegaConf.to_container(object.__getattribute__(fresh, "config"))
    for dotted, value in leaves(tree):
        assert fresh[dotted] == value, dotted
    before = cfg.functions.reciprocal_nr_iters
    with cfg.temp_override({"functions.reciprocal_nr_iters": 3, "encoder.precision_bits": 12}):
        assert (cfg.functions.reciprocal_nr_iters, cfg.encoder.precision_bits) == (3, 12)
        with cfg.temp_override({"functions.reciprocal_nr_iters": 4}):
            assert cfg.functions.reciprocal_nr_iters == 4
        assert cfg.functions.reciprocal_nr_iters == 3
    assert cfg.functions.reciprocal_nr_iters == before
    provider = cfg.mpc.provider
    try:
        cfg.mpc.provider = "TFP"
        assert cfg["mpc.provider"] == "TFP"
        cfg["mpc.provider"] = "TTP"
        assert cfg.mpc.provider == "TTP"
    finally:
        cfg.mpc.provider = provider
    with pytest.raises(AttributeError):
        cfg.functions.no_such_setting  # noqa: B018


def _protocol_patches_party(rank):
    import crypten
    import crypten.communicator as comm
    import torch.distributed as dist
    from crypten.cryptensor import CrypTensor
    from crypten.mpc import MPCTensor

    size = comm.get().get_world_size()
    out = {"rank": rank}
    # patch 8: openings by exchange equal the sum (XOR) of every party's share, batched or not
    mine = [torch.arange(5) * (rank + 1), torch.full((2, 3), 1 << rank)]
    before = compat.communication_stats()["bytes"]
    out["sum"] = comm.get().all_reduce(mine, batched=True)
    out["sum_bytes"] = compat.communication_stats()["bytes"] - before
    out["xor"] = comm.get().all_reduce(mine[1], op=dist.ReduceOp.BXOR)
    # patch 14: a gather by messages: every party's tensor at the root, counted as CrypTen does
    before = compat.communication_stats()["bytes"]
    out["gather"] = comm.get().gather(torch.full((3,), rank), 1)
    out["gather_bytes"] = compat.communication_stats()["bytes"] - before
    out["gather_patched"] = getattr(type(comm.get()), "_mpcft_gather", False)
    # patch 19: all of that went over the direct links; CrypTen's send and recv do too
    channel = comm.get()
    own = getattr(channel, messages.LINKS)
    out["linked"], out["link_messages"] = sorted(own.sockets), dict(own.sent)
    if rank == 0:
        channel.send(torch.arange(3) + 10, 1)
    elif rank == 1:
        out["received"] = channel.recv(torch.zeros(3, dtype=torch.long), 0)
    out["link_messages_after"] = dict(own.sent)
    delattr(channel, messages.LINKS)  # without links: gloo carries the same opening
    out["sum_by_gloo"] = channel.all_reduce(mine, batched=True)
    setattr(channel, messages.LINKS, own)
    # patch 9: Beaver products with two local products
    x = crypten.cryptensor(torch.tensor([[1.5, -2.0], [0.25, 3.0]]), src=0)
    y = crypten.cryptensor(torch.tensor([[2.0, 0.5], [-1.0, 4.0]]), src=size - 1)
    out["mul"], out["matmul"] = (x * y).get_plain_text(), x.matmul(y).get_plain_text()
    # patch 11: an empty shell draws nothing from the generators it shares with its peers
    generators = [crypten.generators[k][torch.device("cpu")] for k in ("prev", "next")]
    states = [g.get_state() for g in generators]
    shell = MPCTensor([])
    out["shell_draws"] = any(s != g.get_state() for s, g in zip(states, generators, strict=True))
    # CrypTen's intended empty shell is a plain tensor (unpatched: a shared tensor of nothing)
    out["shell"] = (type(shell._tensor) is torch.Tensor, shell._tensor.numel(), shell.requires_grad)
    # patch 13: attribute reads skip CrypTen's validation wrapper and decide as CrypTen's does
    fast = CrypTensor.__dict__["__getattribute__"]
    out["unwrapped"] = not hasattr(fast, "__wrapped__")
    out["reads"] = _reads_agree(fast, fast.original, x)
    # patch 18: values just above a negative integer open right (CrypTen's decode: 1.0 low)
    values = torch.tensor([-14.999862670898438, -2.0, -1.5, -0.25, 0.0, 3.75, -99.99])
    out["decoded"] = crypten.cryptensor(values, src=0).get_plain_text()
    return out


READ_NAMES = ["share", "_tensor", "size", "encoder", "requires_grad", "grad_fn", "add", "__add__",
              "__radd__", "mul", "__mul__", "matmul", "square", "neg", "sum", "mpcft_gelu",
              "get_plain_text", "add_", "copy_", "no_such_attribute"]  # fmt: skip


def _reads_agree(fast, original, x) -> list[str]:
    """The names whose reads differ between `fast` and `original`: the same value, or functions
    of the same name, or the same exception type, with and without autograd and gradients."""
    import crypten

    def read(get, t, name):
        try:
            value = get(t, name)
        except Exception as e:  # noqa: BLE001
            return ("raises", type(e).__name__)
        return ("function", value.__name__) if callable(value) else ("value", repr(value))

    differ = []
    leaf = x.clone()
    leaf.requires_grad = True
    for t in (x, leaf):
        for grad in (True, False):
            with crypten.enable_grad() if grad else crypten.no_grad():
                differ += [f"{name} grad={grad} leaf={t is leaf}" for name in READ_NAMES
                           if read(fast, t, name) != read(original, t, name)]  # fmt: skip
    return differ


@pytest.mark.parametrize("parties", [2, 3])
def test_openings_products_shells_and_attribute_reads(parties):
    """Patches 8, 9, 11, 13, 14, 18 and 19 (12 and 10: tests/test_compare.py,
    tests/test_products.py; 16 and 17: tests/test_truncation.py)."""
    from mpc_ft.multiparty import run_multiparty

    for out in run_multiparty(_protocol_patches_party, parties=parties):
        ranks = range(parties)
        assert torch.equal(out["sum"][0], torch.arange(5) * sum(r + 1 for r in ranks))
        assert torch.equal(out["sum"][1], torch.full((2, 3), sum(1 << r for r in ranks)))
        # counted as sent and received, to and from every peer: 2 (P - 1) 11 elements of 8 B
        assert out["sum_bytes"] == 2 * (parties - 1) * 11 * 8
        assert torch.equal(out["xor"], torch.full((2, 3), (1 << parties) - 1))
        rank = out["rank"]
        if rank == 1:  # the root receives P - 1 tensors of 3 elements; the others send one
            assert [t.tolist() for t in out["gather"]] == [[r] * 3 for r in ranks]
        else:
            assert out["gather"] == [None]
        assert out["gather_bytes"] == 8 * 3 * ((parties - 1) if rank == 1 else 1)
        assert out["gather_patched"]
        peers = [r for r in ranks if r != rank]
        assert out["linked"] == peers
        # two openings (SUM, XOR) to every peer, and the gather's message to the root (party 1)
        assert out["link_messages"] == {p: 3 if p == 1 else 2 for p in peers}
        if rank == 1:
            assert out["received"].tolist() == [10, 11, 12]
        sent = dict(out["link_messages"])
        if rank == 0:  # and the one send
            sent[1] += 1
        assert out["link_messages_after"] == sent
        assert all(torch.equal(a, b) for a, b in zip(out["sum_by_gloo"], out["sum"], strict=True))
        x = torch.tensor([[1.5, -2.0], [0.25, 3.0]])
        y = torch.tensor([[2.0, 0.5], [-1.0, 4.0]])
        assert torch.allclose(out["mul"], x * y, atol=1e-3)
        assert torch.allclose(out["matmul"], x @ y, atol=1e-3)
        assert not out["shell_draws"] and out["shell"] == (True, 0, False)
        assert out["unwrapped"] and out["reads"] == []
        decoded = torch.tensor([-14.999862670898438, -2.0, -1.5, -0.25, 0.0, 3.75, -99.99])
        assert (out["decoded"] - decoded).abs().max() < 2e-5


def _reveal_to_party_zero(rank):
    import crypten
    import torch.distributed as dist
    from crypten.mpc.primitives import BinarySharedTensor

    secret = torch.arange(12) * 1000 + 7
    x = crypten.cryptensor(secret.float(), src=1)
    ring = x.share.clone()  # gloo's own reduce, as CrypTen called it before patch 21
    dist.reduce(ring, 0, group=compat.communicator().main_group)
    shown = None if rank == 0 else int((ring == secret * 2**16).sum())
    calls, original = [], dist.reduce
    dist.reduce = lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    try:
        arithmetic = x.get_plain_text(dst=0)
        binary = BinarySharedTensor(secret, src=1).get_plain_text(dst=0)
    finally:
        dist.reduce = original
    return shown, len(calls), arithmetic, binary


@pytest.mark.parametrize("parties", [2, 3])
def test_a_reveal_to_one_party_shows_the_others_nothing(parties):
    """Patch 21. gloo's reduce is a ring reduce-scatter, then a gather: every party but the
    destination holds the plaintext of its part of the tensor on the way (pinned here), so
    CrypTen's get_plain_text(dst=k) showed the others part of the value (the trained head, the
    client's predictions). Now the shares go to k alone, and gloo's reduce is never called."""
    results = run_multiparty(_reveal_to_party_zero, parties=parties)
    assert sum(shown for shown, _, _, _ in results[1:]) >= 12 // parties  # the gloo fact
    assert all(calls == 0 for _, calls, _, _ in results)
    _, _, arithmetic, binary = results[0]
    secret = torch.arange(12) * 1000 + 7
    assert torch.equal(arithmetic, secret.float()) and torch.equal(binary, secret)
    assert all(a is None and b is None for _, _, a, b in results[1:])
