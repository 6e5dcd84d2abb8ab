"""Federated mode: the config, the secure aggregate against the plaintext weighted average (with
every decryption recorded), the range check, and `mpc-ft demo --mode federated` end to end."""

from __future__ import annotations

import pytest
import torch

from mpc_ft import federated, train
from mpc_ft import head as head_def
from mpc_ft.config import (
    BackboneConfig,
    FederatedConfig,
    HeadConfig,
    JobConfig,
    PartyConfig,
    RevealConfig,
    TrainConfig,
)
from mpc_ft.errors import BadInput
from mpc_ft.multiparty import run_multiparty

HEAD = HeadConfig(d_model=8, num_heads=2, d_ffn=16, num_blocks=1)
COUNTS = (12, 20)  # unequal, so that weighting matters
WIDTH = 6


def _job(min_examples: int = 16, max_examples: int = 256, mode: str = "federated") -> JobConfig:
    parties = (
        PartyConfig("alice", ("data_owner",)),
        PartyConfig("bob", ("data_owner", "model_owner")),
        PartyConfig("dealer", ("dealer",)),
    )
    return JobConfig(
        name="fed", labels=("a", "b"), parties=parties, backbone=BackboneConfig(max_tokens=4),
        head=HEAD,
        train=TrainConfig(batch_size=8, lr=0.1, momentum=0.9, seed=2, mode=mode),
        federated=FederatedConfig(rounds=2, local_epochs=2, min_examples=min_examples,
                                  max_examples=max_examples),
    )  # fmt: skip


def _owner(n: int, label_bias: float, seed: int) -> train.Dataset:
    """Non-IID: each owner's label mix differs, and so does its update."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, WIDTH, generator=g)
    mask = (torch.arange(4) < torch.randint(1, 5, (n, 1), generator=g)).float()
    labels = (torch.rand(n, generator=g) < label_bias).long()
    y = torch.nn.functional.one_hot(labels, 2).float()
    return train.Dataset.counted(x * mask.unsqueeze(-1), mask, y)


OWNERS = [_owner(COUNTS[0], 0.2, 0), _owner(COUNTS[1], 0.9, 1)]


# ------------------------------------------------------------------------------- config


def test_federated_config_checks():
    assert _job().train.mode == "federated"
    with pytest.raises(BadInput, match="train.mode must be one of"):
        _job(mode="fedavg")
    with pytest.raises(BadInput, match="max_examples must be between"):
        _job(min_examples=10, max_examples=10 * 1025)
    with pytest.raises(BadInput, match="max_examples must be between"):
        _job(min_examples=10, max_examples=9)
    with pytest.raises(BadInput, match="reveal.head = 'nobody' cannot hold in federated mode"):
        JobConfig(**{**vars(_job()), "reveal": RevealConfig(head="nobody")})


def test_demo_job_declares_a_range_around_the_examples_actually_dealt():
    from mpc_ft.launch import DemoOptions, build_job

    opts = DemoOptions(mode="federated", rounds=4, local_epochs=2)  # train_size 1200
    job = build_job(opts, ("a", "b"), train_examples=24)  # a 24-row dataset of one's own
    assert (job.train.mode, job.federated.rounds, job.federated.local_epochs) == ("federated", 4, 2)
    assert (job.federated.min_examples, job.federated.max_examples) == (6, 96)
    assert build_job(DemoOptions(), ("a", "b")).train.mode == "mpc"


def test_job_file_round_trip_keeps_the_federated_section(tmp_path):
    from mpc_ft.config import load_job

    job = _job()
    (tmp_path / "job.toml").write_text(job.to_toml())
    loaded = load_job(tmp_path / "job.toml")
    assert loaded.federated == job.federated and loaded.train.mode == "federated"
    assert loaded.fingerprint() == job.fingerprint()


# ----------------------------------------------------------------- under MPC, 2 owners


def _rounds_party(rank, job, owners, bad_job):
    import crypten
    from crypten.mpc import MPCTensor

    from mpc_ft.sharing import Revealer, share_head

    opened = []  # every decryption on this party, through any code path
    original = MPCTensor.get_plain_text

    def spy(self, dst=None):
        value = original(self, dst=dst)
        opened.append(value.detach().clone().reshape(-1))
        return value

    MPCTensor.get_plain_text = spy
    try:
        initial = None
        if rank == 1:  # bob, the model owner
            initial = head_def.init_params(job.head, WIDTH, 2, job.train.seed)
        shapes = head_def.param_shapes(job.head, WIDTH, 2)
        shared = share_head(crypten, initial, shapes, src=1)
        revealer = Revealer(job, rank, federated.declared_reveals(job, shapes, 0))  # checked
        params, history = federated.run_rounds(crypten, job, rank, owners[rank], shared, revealer)
        # Counts outside the declared range: every party stops with the same BadInput.
        fed = bad_job.federated
        mine = federated.contribution(len(owners[rank]), {"w": torch.ones(3)},
                                      train.History(loss=[0.5], accuracy=[0.5]), fed)  # fmt: skip
        _, weight = federated.secure_weighted_mean(crypten, fed, mine, 5, [0, 1], rank)
        try:
            federated.check_total_in_range(weight, fed, Revealer(bad_job, rank))
            refused = None
        except BadInput as e:
            refused = str(e)
    finally:
        MPCTensor.get_plain_text = original
    return params, history, revealer.log, opened, refused


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def test_secure_aggregate_is_the_weighted_average_and_no_update_is_opened():
    job = _job()
    bad_job = _job(min_examples=40, max_examples=400)  # 12 + 20 = 32 examples: below it
    results = run_multiparty(_rounds_party, parties=2, args=(job, OWNERS, bad_job))
    twin, twin_history = federated.simulate(
        head_def.init_params(HEAD, WIDTH, 2, job.train.seed), OWNERS, job
    )

    # The plaintext path, round by round: each owner's update and their weighted average.
    glob = head_def.init_params(HEAD, WIDTH, 2, job.train.seed)
    individual, averages = [], []
    for r in range(job.federated.rounds):
        updates = [federated.local_update(glob, d, job, r)[0] for d in OWNERS]
        average = {k: sum(n * u[k] for n, u in zip(COUNTS, updates, strict=True)) / sum(COUNTS)
                   for k in glob}  # fmt: skip
        individual += [_flat(u) for u in updates]
        averages.append(_flat(average))
        glob = {k: glob[k] + average[k] for k in glob}

    size = averages[0].numel()
    for params, history, log, opened, refused in results:
        assert log == _federated_reveals(metrics=4)
        # Instrumented: exactly the logged openings happened (+ the refused job's one bit).
        assert [v.numel() for v in opened] == [size, 1, 4, size, 4, size, 1]
        round1 = opened[3]
        # The opened aggregate is the plaintext weighted average, within fixed-point error.
        torch.testing.assert_close(round1, averages[0], atol=3e-4, rtol=2e-3)
        for value in (opened[3], opened[5]):
            for update in individual:  # no opened value is any owner's own update
                assert (value - update).abs().max() > 50 * 3e-4
        # Round 2 starts from the revealed (fixed-point) head: the twin agrees loosely.
        for name in twin:
            torch.testing.assert_close(params[name], twin[name], atol=2e-3, rtol=1e-2)
        assert history.loss == pytest.approx(twin_history.loss, abs=2e-3)
        assert history.accuracy == pytest.approx(twin_history.accuracy, abs=1e-3)
        assert refused and "outside [40, 400]" in refused
    assert results[0][2] == results[1][2]  # both parties learned the same things


def _federated_reveals(metrics: int) -> list[dict]:
    """Every federated run's reveal log over 2 rounds (16 head tensors); `metrics`: the values
    of each round's per-local-epoch mean loss and accuracy."""
    return [
        {"what": "initial head", "to": "all", "count": 16},
        {"what": "total training examples within [federated.min_examples, max_examples]",
         "to": "all", "count": 1},
        {"what": "round 1: mean loss and accuracy per local epoch", "to": "all", "count": metrics},
        {"what": "round 1: averaged update", "to": "all", "count": 16},
        {"what": "round 2: mean loss and accuracy per local epoch", "to": "all", "count": metrics},
        {"what": "round 2: averaged update", "to": "all", "count": 16},
    ]  # fmt: skip


def test_the_federated_policy_declares_the_reveals_a_run_makes_and_refuses_others():
    from mpc_ft import compat
    from mpc_ft.sharing import Revealer, UndeclaredReveal

    compat.import_crypten()  # Revealer.scalars imports it; the check refuses before decrypting
    job = _job()
    shapes = head_def.param_shapes(job.head, WIDTH, 2)
    assert federated.declared_reveals(job, shapes, 0) == _federated_reveals(4)  # 2 local epochs
    policy = federated.declared_reveals(job, shapes, 7)
    assert policy[-1] == {"what": "test accuracy", "to": "all", "count": 1}
    revealer = Revealer(job, 0, policy)
    with pytest.raises(UndeclaredReveal, match="initial head"):
        revealer.scalars([], "round 1: averaged update")


# ------------------------------------------------------------------- the demo, end to end


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--rounds", "0"], "federated.rounds must be at least 1"),
        (["--local-epochs", "0"], "federated.local_epochs must be at least 1"),
        (["--mode", "fedavg"], "argument --mode: invalid choice"),
    ],  # fmt: skip
)
def test_demo_rejects_bad_federated_options_in_one_line(tmp_path, args, culprit):
    from tests.test_cli import _assert_one_line_error, _mpc_ft

    demo = ["demo", "--out", "run", "--cache", "cache", "--no-progress", "--mode", "federated"]
    _assert_one_line_error(_mpc_ft([*demo, *args], cwd=tmp_path), culprit)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_federated_demo_tiny(tmp_path):
    from tests.test_demo import _demo

    report = _demo(tmp_path, "--train-size", "40", "--test-size", "20", "--mode", "federated",
                   "--rounds", "2", "--local-epochs", "1")  # fmt: skip
    assert (report["mode"], report["rounds"], report["local_epochs"]) == ("federated", 2, 1)
    assert report["epochs"] == 2 and len(report["loss_mpc"]) == len(report["loss_plaintext"]) == 2
    assert report["steps"] == 2 * 2  # 2 rounds x (alice: 20 examples, bob: 20) in batches of 32
    assert report["loss_mpc"] == pytest.approx(report["loss_plaintext"], abs=5e-3)
    assert set(report["bytes_sent_per_party"]) == {"alice", "bob"}
    assert report["reveals"] == [*_federated_reveals(metrics=2),
                                 {"what": "test accuracy", "to": "all", "count": 1}]  # fmt: skip
    assert abs(report["accuracy_mpc"] - report["accuracy_plaintext"]) <= 1 / 20 + 1e-9
    from mpc_ft.head import HeadModule

    head = HeadModule.load(tmp_path / "run" / "head")  # bob, the model owner, wrote the last head
    assert head(torch.randn(3, 32, 384), torch.ones(3, 32)).shape == (3, 2)


# ---------------------------------------------------- the comparison table, from benchmark rows


def test_comparison_table_is_rendered_from_rows_and_spliced_in_place(tmp_path):
    from benchmarks import render

    log = [{"what": "initial head", "to": "all", "count": 16},
           {"what": "round 1: averaged update", "to": "all", "count": 16},
           {"what": "round 2: averaged update", "to": "all", "count": 16},
           {"what": "trained head", "to": "bob", "count": 16}]  # fmt: skip
    row = {"group": "federated", "owners": 2, "split": "non-iid", "method": "federated",
           "label0_share": [0.8, 0.2], "accuracy": 0.7, "twin_accuracy": 0.71,
           "seconds": {"median": 2.0}, "bytes_per_party": [2**20, 2**21], "reveals": log,
           "config": {"train": 10, "test": 5, "epochs": 2, "rounds": 2,
                      "local_epochs": 1}}  # fmt: skip
    assert render.learned(row) == (
        "all: initial head, 2 x averaged update (so the global head); bob: trained head"
    )
    block = render.federated_table([row, {**row, "group": "other"}])
    assert block[0] == render.FEDERATED_START and block[-1] == render.FEDERATED_END
    assert "| 2 | non-iid (0.80, 0.20) | federated (MPC aggregation) | 70.0% (71.0%) | 2.00 s" \
        " | 1.0 / 2.0 |" in "\n".join(block)  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n" + render.FEDERATED_START + "\nold\n" + render.FEDERATED_END + "\n\n## y\n"
    )
    render.splice(readme, block)
    render.splice(readme, block)  # idempotent: the block is replaced, not appended again
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith("\n\n## y\n") and "old" not in text
    assert text.count(render.FEDERATED_START) == 1 and "70.0% (71.0%)" in text
