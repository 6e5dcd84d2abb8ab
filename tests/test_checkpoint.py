"""Checkpoints (mpc_ft/checkpoint.py) and resuming training (train.train(resume=...)).

tests/test_deploy.py kills a real `mpc-ft party` process mid-training and resumes every party."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mpc_ft import checkpoint, train
from mpc_ft import head as head_def
from mpc_ft.config import BackboneConfig, HeadConfig, JobConfig, PartyConfig, TrainConfig
from mpc_ft.errors import BadInput
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import TorchOps
from tests.test_mpc_training import _data

HEAD = HeadConfig(d_model=16, num_heads=2, d_ffn=32, num_blocks=1)
TRAIN = TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.01, seed=3)
JOB = JobConfig(
    name="ckpt",
    labels=("a", "b"),
    parties=(
        PartyConfig("alice", ("data_owner", "model_owner")),
        PartyConfig("bob", ("data_owner",)),
        PartyConfig("dealer", ("dealer",)),
    ),  # fmt: skip
    backbone=BackboneConfig(max_tokens=8),
    train=TRAIN,
)


def _twin(data, params, **kw):
    return train.train(params, data, head=HEAD, train_cfg=TRAIN, ops=TorchOps,
                       reveal_scalars=train.plaintext_reveal, **kw)  # fmt: skip


@pytest.mark.parametrize("at", [1, 3, 4])  # mid-epoch; an epoch's end (3 steps of 20 rows)
def test_the_twin_resumed_from_any_step_ends_exactly_where_the_uninterrupted_run_does(at):
    data = _data(n=20)
    params = head_def.init_params(HEAD, 24, 2, seed=0)
    saved = {}
    whole, history = _twin(
        data, params, on_step=lambda s: saved.setdefault(s.step, copy.deepcopy(s))
    )
    assert sorted(saved) == [1, 2, 3, 4, 5, 6]
    assert saved[3].seen == [] and len(saved[3].history.loss) == 1  # saved after its metrics
    resumed, resumed_history = _twin(data, None, resume=saved[at])
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert (resumed_history.loss, resumed_history.accuracy) == (history.loss, history.accuracy)
    assert resumed_history.steps == history.steps == 6


def _share_party(rank: int, out: str, data, params) -> dict:
    """Train 2 epochs (6 steps) saving every step; then resume from step 5 in the same
    processes (fresh CrypTensors from the saved shares)."""
    import crypten

    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten)
    name = JOB.compute_parties[rank].name
    shared = {k: crypten.cryptensor(v, src=0) for k, v in params.items()}
    sdata = train.Dataset(*(crypten.cryptensor(t, src=0) for t in (data.x, data.mask, data.y)))
    at_5 = {}

    def save(state):
        checkpoint.save(JOB, Path(out), name, state)
        if state.step == 5:
            at_5.update({k: v.get_plain_text() for k, v in state.params.items()})

    def reveal(values, what):
        return [v.get_plain_text().item() for v in values]

    kw = dict(head=HEAD, train_cfg=TRAIN, ops=ops, reveal_scalars=reveal)
    whole, history = train.train(shared, sdata, on_step=save, **kw)
    held = checkpoint.steps(JOB, Path(out), name)
    try:
        checkpoint.load(JOB, Path(out), name, 4, crypten, ops)
        gone = False
    except BadInput:
        gone = True  # only the newest KEEP are kept
    state = checkpoint.load(JOB, Path(out), name, 5, crypten, ops)
    loaded = {k: v.get_plain_text() for k, v in state.params.items()}
    resumed, resumed_history = train.train(None, sdata, resume=state, **kw)
    return {
        "held": held,
        "gone": gone,
        "exact": all(torch.equal(loaded[k], at_5[k]) for k in at_5),
        "whole": {k: v.get_plain_text() for k, v in whole.items()},
        "resumed": {k: v.get_plain_text() for k, v in resumed.items()},
        "loss": (history.loss, resumed_history.loss),
    }


def test_mpc_shares_saved_and_resumed_match_the_uninterrupted_run(tmp_path):
    data = _data(n=20)
    params = head_def.init_params(HEAD, 24, 2, seed=0)
    result = run_multiparty(_share_party, parties=2, args=(str(tmp_path), data, params))[0]
    assert result["held"] == [5, 6] and result["gone"]  # the newest checkpoint.KEEP
    assert result["exact"]  # the shares come back bit for bit
    for f in ("alice", "bob"):
        files = sorted(p.name for p in (tmp_path / "checkpoints" / f).iterdir())
        assert files == ["step-000005.pt", "step-000006.pt"]  # no temporary file left
    share = torch.load(tmp_path / "checkpoints" / "alice" / "step-000005.pt")["params"]["cls.w"]
    assert share.dtype == torch.int64  # a share, not the value
    for name, whole in result["whole"].items():
        err = (result["resumed"][name] - whole).abs().max().item()
        assert err < 2e-3, (name, err)  # fresh randomness after resuming: fixed-point error
    whole_loss, resumed_loss = result["loss"]
    assert resumed_loss[0] == whole_loss[0]  # epoch 1 is restored from the checkpoint
    assert abs(resumed_loss[1] - whole_loss[1]) < 5e-3


def test_a_checkpoint_of_another_job_or_a_torn_file_is_refused_by_name(tmp_path):
    state = train.TrainState(params={})
    path = checkpoint.save(JOB, tmp_path, "alice", state)
    assert checkpoint.steps(JOB, tmp_path, "alice") == [0]
    other = JobConfig(**{**vars(JOB), "name": "another"})
    with pytest.raises(BadInput, match=r"step-000000.pt is from another job"):
        checkpoint.steps(other, tmp_path, "alice")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BadInput, match=r"step-000000.pt cannot be read"):
        checkpoint.steps(JOB, tmp_path, "alice")
    path.rename(path.with_name("step-000003.pt"))
    path.with_name("step-000003.pt").unlink()
    checkpoint.save(JOB, tmp_path, "bob", state)
    path_for_bob = checkpoint.path_for(tmp_path, "bob", 0)
    path_for_bob.rename(checkpoint.path_for(tmp_path, "bob", 7))
    with pytest.raises(BadInput, match="not what its name says"):
        checkpoint.steps(JOB, tmp_path, "bob")


def _watchdog_party(rank: int, data, params, lr: float, corrupt_at: int | None) -> dict:
    """Train under MPC; at step `corrupt_at` (once) add 2^48 (4e9 in value: what a failed
    truncation adds) to one element of party 0's share of cls.w."""
    import dataclasses

    import crypten

    from mpc_ft.ops import MpcOps

    ops = MpcOps(crypten)
    shared = {k: crypten.cryptensor(v, src=0) for k, v in params.items()}
    sdata = train.Dataset(*(crypten.cryptensor(t, src=0) for t in (data.x, data.mask, data.y)))
    log = []

    def reveal(values, what):
        log.append(what)
        return [v.get_plain_text().item() for v in values]

    calls = []
    original = train.sgd_step

    def sgd_step(p, v, cfg, ops_, rows):
        new, vel = original(p, v, cfg, ops_, rows)
        calls.append(1)
        if len(calls) == corrupt_at and rank == 0:  # once: the retried step is clean
            new["cls.w"].share[0, 0] += 2**48
        return new, vel

    train.sgd_step = sgd_step
    cfg = dataclasses.replace(TRAIN, lr=lr, watchdog_every=1)
    try:
        trained, history = train.train(shared, sdata, head=HEAD, train_cfg=cfg, ops=ops,
                                       reveal_scalars=reveal)  # fmt: skip
    except BadInput as e:
        return {"error": str(e), "log": log}
    finally:
        train.sgd_step = original
    return {"params": {k: v.get_plain_text() for k, v in trained.items()}, "log": log,
            "loss": history.loss}  # fmt: skip


def test_a_wrapped_parameter_is_caught_on_shares_rolled_back_and_retrained(tmp_path):
    data = _data(n=20)
    params = head_def.init_params(HEAD, 24, 2, seed=0)
    clean, hit = (run_multiparty(_watchdog_party, parties=2, args=(data, params, 0.1, at))[0]
                  for at in (None, 2))  # fmt: skip
    assert hit["log"].count("watchdog step 2") == 3  # failed (count, then flags), passed
    for name, value in clean["params"].items():
        err = (hit["params"][name] - value).abs().max().item()
        assert err < 2e-3, (name, err)  # the retried steps end where the clean run does
    assert clean["log"].count("watchdog step 2") == 1


def test_a_persistent_overflow_stops_with_the_layer_and_the_fixes():
    data = _data(n=20)
    params = head_def.init_params(HEAD, 24, 2, seed=0)
    result = run_multiparty(_watchdog_party, parties=2, args=(data, params, 1e9, None))[0]
    assert "fixed-point overflow in" in result["error"] and "lower train.lr" in result["error"]
    assert "at step 1" in result["error"]
