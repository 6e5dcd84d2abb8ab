"""Training and sharing under MPC against the plaintext twin, through the multi-party helper."""

from __future__ import annotations

import torch

from mpc_ft import head as head_def
from mpc_ft import train
from mpc_ft.config import (
    NATIVE_HEAD,
    BackboneConfig,
    HeadConfig,
    JobConfig,
    PartyConfig,
    TrainConfig,
)
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import MpcOps, TorchOps

HEAD = HeadConfig(d_model=16, num_heads=2, d_ffn=32, num_blocks=1)
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.01, seed=3)


def _data(n=16, t=8, d=24, c=2) -> train.Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, d, generator=g)
    mask = (torch.arange(t) < torch.randint(2, t + 1, (n, 1), generator=g)).float()
    y = torch.nn.functional.one_hot(torch.randint(0, c, (n,), generator=g), c).float()
    return train.Dataset(x * mask.unsqueeze(-1), mask, y)


def _train_party(rank, params, data):
    import crypten

    from mpc_ft.sharing import Revealer

    ops = MpcOps(crypten)
    shared = {k: crypten.cryptensor(v, src=1) for k, v in params.items()}
    sdata = train.Dataset(*(crypten.cryptensor(t, src=0) for t in (data.x, data.mask, data.y)))
    job = _job(2)
    revealer = Revealer(job, rank)
    trained, history = train.train(
        shared, sdata, head=HEAD, train_cfg=TRAIN, ops=ops, reveal_scalars=revealer.scalars
    )
    return {k: v.get_plain_text() for k, v in trained.items()}, history, revealer.log


def _job(owners: int) -> JobConfig:
    parties = [PartyConfig(f"p{i}", ("data_owner",)) for i in range(owners)]
    parties.append(PartyConfig("m", ("model_owner",)))
    parties.append(PartyConfig("dealer", ("dealer",)))
    return JobConfig(
        name="t", labels=("a", "b"), parties=tuple(parties), backbone=BackboneConfig(max_tokens=4)
    )


def test_two_mpc_training_steps_match_the_twin():
    data = _data()
    params = head_def.init_params(HEAD, 24, 2, seed=0)
    twin, twin_history = train.train(
        params, data, head=HEAD, train_cfg=TRAIN, ops=TorchOps,
        reveal_scalars=train.plaintext_reveal,
    )  # fmt: skip
    mpc, history, log = run_multiparty(_train_party, parties=2, args=(params, data))[0]
    assert history.steps == twin_history.steps == 2
    assert abs(history.loss[0] - twin_history.loss[0]) < 5e-3
    # A near-tie logit can flip under fixed-point noise: at most one of 16 examples may differ.
    assert abs(history.accuracy[0] - twin_history.accuracy[0]) <= 1 / 16 + 1e-9
    for name in twin:
        scale = (twin[name] - params[name]).abs().max().item()  # how far training moved it
        err = (mpc[name] - twin[name]).abs().max().item()
        assert err <= 0.1 * scale + 2e-4, (name, err, scale)  # a lost gradient: err = scale
    # the overflow watchdog's one number at the last step (watchdog_every 10 > 2 steps)
    assert log == [{"what": "watchdog step 2", "to": "all", "count": 1},
                   {"what": "epoch 1", "to": "all", "count": 2}]  # fmt: skip


def _share_party(rank, locals_by_rank, counts):
    import crypten

    from mpc_ft import sharing
    from mpc_ft.handshake import Hello

    job = _job(2)
    shapes = [Hello("p", "f", "v", "v", "v", tokens=4, width=3, train=n, test=m) for n, m in counts]
    shared = sharing.share_datasets(crypten, job, locals_by_rank.get(rank), shapes, rank)
    return {part: [getattr(d, f).get_plain_text() for f in ("x", "mask", "y")]
            for part, d in shared.items() if d is not None}  # fmt: skip


def test_sharing_from_several_owners_reconstructs_exactly():
    g = torch.Generator().manual_seed(5)

    def owner(n):
        x = torch.randn(n, 4, 3, generator=g).mul(100).round().div(100)  # exact in fixed point
        return train.Dataset(x, torch.ones(n, 4), torch.eye(2)[torch.arange(n) % 2])

    locals_by_rank = {0: {"train": owner(3), "test": owner(2)}, 1: {"train": owner(5)}}
    counts = [(3, 2), (5, 0), (0, 0)]
    results = run_multiparty(_share_party, parties=3, args=(locals_by_rank, counts))
    for rank_result in results:  # every party holds shares of the same concatenation
        for part in ("train", "test"):
            owners = [locals_by_rank[r][part] for r in (0, 1) if part in locals_by_rank[r]]
            for i, f in enumerate(("x", "mask", "y")):
                expected = torch.cat([getattr(o, f) for o in owners])
                torch.testing.assert_close(rank_result[part][i], expected, atol=1e-4, rtol=0)


def test_twin_training_equals_torch_optim_sgd_on_the_batch_mean_loss():
    """sgd_step folds the mean's 1/B into lr and keeps the velocity times lr: the twin's
    parameters must still follow torch.optim.SGD on the mean cross-entropy, last short batch
    included (20 rows, batches of 8)."""
    data = _data(n=20)
    params = head_def.init_params(HEAD, 24, 2, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.01, seed=3)
    twin, _ = train.train(params, data, head=HEAD, train_cfg=cfg, ops=TorchOps,
                          reveal_scalars=train.plaintext_reveal)  # fmt: skip
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(ref.values(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)  # fmt: skip
    for epoch in range(cfg.epochs):
        for index in train.batch_order(len(data), cfg.batch_size, cfg.seed, epoch):
            opt.zero_grad()
            logits = head_def.forward(ref, data.x[index], data.mask[index], HEAD, TorchOps)
            loss = torch.nn.functional.cross_entropy(logits, data.y[index].argmax(-1))
            loss.backward()
            opt.step()
    for name in ref:
        torch.testing.assert_close(twin[name], ref[name].detach(), atol=1e-6, rtol=1e-5)


def _obvious_forward(params, x, mask, head: HeadConfig):
    """The head written the obvious way (every normalisation with its gain and shift, then the
    masked mean), from TorchOps' components: head.forward must compute the same function."""
    ops = TorchOps
    B, T, D, H = x.size(0), x.size(1), head.d_model, head.num_heads
    norm = ops.layer_norm if head.norm == "layernorm" else ops.center
    act = ops.gelu if head.activation == "gelu" else ops.quad_activation
    h = x.matmul(params["in.w"]) + params["in.b"] if head.project_input else x
    for i in range(head.num_blocks):
        p = f"b{i}."
        q, k, v = (h.matmul(params[p + "qkv.w"]) + params[p + "qkv.b"]).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        scores = q.matmul(k.transpose(2, 3)) / (D // H) ** 0.5
        key_mask = mask.reshape(B, 1, 1, T)
        weights = (ops.masked_softmax(scores, key_mask) if head.attention == "softmax"
                   else ops.quad_attention(scores, key_mask))  # fmt: skip
        attn = weights.matmul(v).transpose(1, 2).reshape(B, T, D)
        attn = attn.matmul(params[p + "out.w"]) + params[p + "out.b"]
        h = norm(h + attn, params[p + "ln1.g"], params[p + "ln1.b"], head.ln_eps)
        ffn = act(h.matmul(params[p + "ffn1.w"]) + params[p + "ffn1.b"])
        ffn = ffn.matmul(params[p + "ffn2.w"]) + params[p + "ffn2.b"]
        h = norm(h + ffn, params[p + "ln2.g"], params[p + "ln2.b"], head.ln_eps)
    pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return pooled.matmul(params["cls.w"]) + params["cls.b"]


def test_the_head_computes_the_obvious_function():
    """Both heads, 1 and 2 blocks: the last normalisation's gain and shift applied after the
    pooling (head.py) give the same logits as before it."""
    data = _data()
    for native in (False, True):
        for blocks in (1, 2):
            extra = NATIVE_HEAD if native else {}
            head = HeadConfig(d_model=16, num_heads=2, d_ffn=32, num_blocks=blocks, **extra)
            params = head_def.init_params(head, 24, 2, seed=blocks)
            g = torch.Generator().manual_seed(5)
            params = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()}
            got = head_def.forward(params, data.x, data.mask, head)
            want = _obvious_forward(params, data.x, data.mask, head)
            assert torch.allclose(got, want, atol=1e-5), (native, blocks)
