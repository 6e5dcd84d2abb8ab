"""DP-SGD inside MPC (dp.py): clipping against Opacus, the joint noise's spread, accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mpc_ft import dp, train
from mpc_ft import head as head_def
from mpc_ft.config import DpConfig, HeadConfig, TrainConfig
from mpc_ft.errors import BadInput
from mpc_ft.multiparty import run_multiparty
from mpc_ft.ops import MpcOps, TorchOps

HEAD = HeadConfig(d_model=8, num_heads=2, d_ffn=16, num_blocks=1)
D_IN, B = 12, 6


def _batch(n=B, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(t) < torch.randint(2, t + 1, (n, 1), generator=g)).float()
    x = torch.randn(n, t, D_IN, generator=g) * mask.unsqueeze(-1)
    y = torch.nn.functional.one_hot(torch.randint(0, 2, (n,), generator=g), 2).float()
    return x, mask, y


class _Flat(torch.nn.Module):
    """The head as one module with its parameters on itself, for Opacus's functorch per-sample
    gradients (which pass one input: features and mask travel as one tensor)."""

    def __init__(self, params):
        super().__init__()
        self.names = list(params)
        for n, v in params.items():
            self.register_parameter(n.replace(".", "_"), torch.nn.Parameter(v.clone()))

    def forward(self, xm):
        params = {n: getattr(self, n.replace(".", "_")) for n in self.names}
        return head_def.forward(params, xm[..., :-1], xm[..., -1], HEAD)


def _opacus_clipped_sum(params, x, mask, y, c):
    """Opacus's per-sample clipping (DPOptimizer, no noise): sum_i clip_C(g_i); and the norms."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(_Flat(params), force_functorch=True, loss_reduction="sum")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = DPOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=x.size(0), loss_reduction="sum")  # fmt: skip
    logits = model(torch.cat([x, mask.unsqueeze(-1)], -1))
    torch.nn.functional.cross_entropy(logits, y.argmax(-1), reduction="sum").backward()
    norms = torch.stack(
        [p.grad_sample.reshape(x.size(0), -1).norm(dim=1) for p in model.parameters()]
    ).norm(dim=0)
    opt.clip_and_accumulate()
    names = [n.replace(".", "_") for n in params]
    summed = {n: dict(model._module.named_parameters())[f].summed_grad for n, f in
              zip(params, names, strict=True)}  # fmt: skip
    return summed, norms


def _setting():
    params = head_def.init_params(HEAD, D_IN, 2, seed=1)
    x, mask, y = _batch()
    _, norms = _opacus_clipped_sum(params, x, mask, y, c=1e9)
    c = norms.min().item() * 1.1  # one example unclipped, the others by factors 0.5-0.9
    return params, x, mask, y, c, norms


def test_inv_sqrt_in_range_is_accurate_over_the_whole_range():
    t = torch.logspace(0, math.log10(dp.CLIP_RANGE), 400, dtype=torch.float64)
    y = dp.inv_sqrt_in_range(t, 1.0, dp.CLIP_RANGE)
    assert (y * t.sqrt() - 1).abs().max() < 2 * dp.CLIP_TOL


@pytest.mark.parametrize("c", [1.0, 0.1, 0.003])
def test_clip_factors_are_min_of_one_and_bound_over_norm_and_drop_beyond_range(c):
    sq = torch.tensor([0.25, 1.0, 4.0, 100.0, 1e5, 4.0 * dp.CLIP_RANGE], dtype=torch.float64)
    f = dp.clip_factors(sq * c**2, c)
    expected = torch.tensor([1.0, 1.0, 0.5, 0.1, 1e5**-0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(f, expected, atol=2e-3, rtol=0)


def _clip_party(rank, sq, c):
    import crypten

    return dp.clip_factors(crypten.cryptensor(sq, src=0), c).get_plain_text()


def test_clip_factors_on_shares_keep_every_product_small():
    """Under MPC, including norms 1e3 C (u = 1e6: computed as a product, its truncation failed
    about once in 4,000 units at 16 bits, which stopped a DP run at step 110)."""
    c = 0.1
    u = torch.cat([torch.tensor([0.25, 1.0, 4.0, 100.0, 1e5, 1e6, 4.0 * dp.CLIP_RANGE]),
                   torch.full((2000,), 9e5)])  # fmt: skip
    f = run_multiparty(_clip_party, parties=2, args=(u * c**2, c))[0]
    expected = torch.where(u <= dp.CLIP_RANGE, 1 / u.clamp(min=1).sqrt(), torch.zeros(()))
    torch.testing.assert_close(f, expected, atol=3e-3, rtol=0)


def test_twin_clipping_matches_opacus_per_sample_clipping():
    params, x, mask, y, c, norms = _setting()
    ref, _ = _opacus_clipped_sum(params, x, mask, y, c)
    ours, k = dp.clipped_sum(params, x, mask, y, head=HEAD, ops=TorchOps, max_grad_norm=c, m=1)
    assert k == B and (norms > c * 1.05).sum() >= 3 and (norms < c * 0.95).any()
    for name in params:  # float32 paths differ by ~1e-4
        torch.testing.assert_close(ours[name], ref[name], atol=2e-4, rtol=1e-3)
    # the setting discriminates: unclipped, the sum is far outside the MPC test's tolerance
    unclipped, _ = _opacus_clipped_sum(params, x, mask, y, c=1e9)
    assert max((unclipped[n] - ref[n]).abs().max() / ref[n].abs().max() for n in ref) > 0.2


def _clip_units(params, x, mask, y, weight, c, m):
    """The reference, unit by unit with torch autograd: sum_j clip_C(sum_{r in j} w_r g_r)."""
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, x.size(0), m):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        rows = slice(start, start + m)
        logits = head_def.forward(leaves, x[rows], mask[rows], HEAD)
        loss = torch.nn.functional.cross_entropy(logits, y[rows].argmax(-1), reduction="none")
        (loss * weight[rows, 0]).sum().backward()
        norm = torch.stack([v.grad.norm() for v in leaves.values()]).norm()
        for n, v in leaves.items():
            expected[n] += v.grad * min(1.0, c / max(norm.item(), 1e-12))
    return expected


def test_microbatches_clip_each_microbatch_weighted_sum():
    """num_microbatches: every m consecutive rows' gradient sum (rows weighted by their 0/1
    inclusion) is one clipping unit."""
    params, x, mask, y, c, _ = _setting()
    weight = torch.tensor([[1.0], [0.0], [1.0], [1.0], [1.0], [0.0]])
    ours, k = dp.clipped_sum(params, x, mask, y, weight, head=HEAD, ops=TorchOps,
                             max_grad_norm=c, m=3)  # fmt: skip
    assert k == 2
    expected = _clip_units(params, x, mask, y, weight, c, m=3)
    for name in params:  # float32 paths differ ~1e-4
        torch.testing.assert_close(ours[name], expected[name], atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="whole microbatches"):
        dp.clipped_sum(params, x, mask, y, head=HEAD, ops=TorchOps, max_grad_norm=c, m=4)


def test_a_row_of_weight_zero_contributes_nothing():
    """A dummy slot (sampling.py) adds nothing to the clipped sum, whatever it holds."""
    params, x, mask, y, c, _ = _setting()
    weight = torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0], [1.0]])
    ours, _ = dp.clipped_sum(params, x, mask, y, weight, head=HEAD, ops=TorchOps,
                             max_grad_norm=c, m=1)  # fmt: skip
    real = weight[:, 0].bool()
    ref, _ = _opacus_clipped_sum(params, x[real], mask[real], y[real], c)
    for name in params:
        torch.testing.assert_close(ours[name], ref[name], atol=2e-4, rtol=1e-3)


def _mpc_party(rank, params, x, mask, y, c, twin_data):
    import crypten

    from mpc_ft.sampling import PoissonBatches
    from mpc_ft.sharing import Revealer, share
    from tests.test_mpc_training import _job

    ops = MpcOps(crypten)
    shared = {k: crypten.cryptensor(v, src=1) for k, v in params.items()}
    sx, smask, sy = (crypten.cryptensor(t, src=0) for t in (x, mask, y))
    clipped, _ = dp.clipped_sum(shared, sx, smask, sy, head=HEAD, ops=ops, max_grad_norm=c, m=1)
    clipped = {k: v.get_plain_text() for k, v in clipped.items()}
    noise = dp.joint_noise(crypten, 20_000, std=0.5).get_plain_text()
    # two DP training steps (noise off) through train.train, with its reveal policy; owner 0
    # shares each step's Poisson batch (rate 1 here: every example, in random slots)
    run = dp.DpRun(DpConfig(enabled=True, max_grad_norm=c), parties=2)
    n = twin_data[0].size(0)
    privacy = dp.spend(run.config, [n], TRAIN)
    plain = train.Dataset(*twin_data) if rank == 0 else None
    data = PoissonBatches(
        [(0, n, plain)],
        privacy.slots,
        privacy.sample_rate,
        (twin_data[0].size(1), D_IN, 2),
        share=lambda v, shape, src: share(crypten, v, shape, src),
    )
    revealer = Revealer(_job(2), rank)
    with pytest.warns(UserWarning, match="NO differential-privacy"):
        trained, history = train.train(shared, data, head=HEAD, train_cfg=TRAIN, ops=ops,
                                       reveal_scalars=revealer.scalars, dp=run)  # fmt: skip
    trained = {k: v.get_plain_text() for k, v in trained.items()}
    return clipped, noise, trained, history, revealer.log


TRAIN = TrainConfig(epochs=2, batch_size=4, lr=0.1, momentum=0.9, seed=3)


def test_mpc_clipping_matches_opacus_and_joint_noise_has_the_configured_std():
    params, x, mask, y, c, _ = _setting()
    ref, _ = _opacus_clipped_sum(params, x, mask, y, c)
    twin_data = _batch(n=4, seed=2)
    clipped, noise, trained, history, log = run_multiparty(
        _mpc_party, parties=2, args=(params, x, mask, y, c, twin_data)
    )[0]
    for name in params:  # fixed-point tolerance, as tests/test_mpc_training.py
        scale = ref[name].abs().max().item()
        err = (clipped[name] - ref[name]).abs().max().item()
        assert err <= 0.03 * scale + 2e-3, (name, err, scale)
    # 2 parties, each std 0.5: the total has std 0.5 * sqrt(2) (any one party's view: 0.5)
    assert abs(noise.mean().item()) < 0.03
    assert abs(noise.std().item() / (0.5 * math.sqrt(2)) - 1) < 0.03, noise.std().item()
    # the same DP training on the twin; no epoch metrics revealed in DP mode
    twin, twin_history = train.train(
        params, train.Dataset(*twin_data), head=HEAD, train_cfg=TRAIN, ops=TorchOps,
        reveal_scalars=train.plaintext_reveal,
        dp=dp.DpRun(DpConfig(enabled=True, max_grad_norm=c), parties=2),
    )  # fmt: skip
    assert history.steps == twin_history.steps == 2 and history.loss == []
    assert history.privacy["slots"] == (4,) and history.privacy["sample_rate"] == 1.0
    assert [r["what"] for r in log] == ["watchdog step 2"]
    for name in twin:
        scale = (twin[name] - params[name]).abs().max().item()
        err = (trained[name] - twin[name]).abs().max().item()
        assert err <= 0.1 * scale + 2e-4, (name, err, scale)  # a lost gradient: err = scale


@pytest.mark.parametrize("parties", [2, 3, 5])
def test_plain_joint_noise_has_the_configured_std(parties):
    std = dp.party_std(noise_multiplier=1.3, max_grad_norm=0.7, parties=parties)
    total = dp.plain_noise(200_000, std, parties)
    # any P - 1 parties' draws: exactly (sigma C)^2; all P: P / (P - 1) times that
    expected = 1.3 * 0.7 * math.sqrt(parties / (parties - 1))
    assert abs(total.std().item() / expected - 1) < 0.01
    assert abs(total.mean().item()) < 0.01


def test_secure_gaussian_is_standard_normal_and_never_repeats():
    a, b = dp.secure_gaussian(100_000), dp.secure_gaussian(100_000)
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1) < 0.015
    assert abs((a.abs() < 1).double().mean().item() - 0.6827) < 0.01
    assert not torch.equal(a, b)


def test_accounting_calibrates_to_the_target_and_reports_epsilon():
    cfg = TrainConfig(epochs=2, batch_size=32)
    calibrated = dp.spend(DpConfig(enabled=True, target_epsilon=8.0), 1200, cfg)
    assert calibrated.steps == 2 * 38 + dp.ROLLBACKS * cfg.watchdog_every
    assert calibrated.sample_rate == 32 / 1200
    assert calibrated.epsilon <= 8.0 and calibrated.epsilon > 7.0
    fixed = dp.spend(DpConfig(enabled=True, noise_multiplier=calibrated.noise_multiplier * 2),
                     1200, cfg)  # fmt: skip
    assert fixed.epsilon < calibrated.epsilon  # more noise, less spent
    assert dp.spend(DpConfig(enabled=True), 1200, cfg).epsilon == math.inf
    # the slots: more than the expected batch, and their overflow within 1% of delta
    assert calibrated.slots[0] > 32 and calibrated.delta == 1e-5
    blowup = 1 + math.exp(calibrated.epsilon)
    assert 0 < blowup * calibrated.overflow_probability <= dp.OVERFLOW_SHARE * 1e-5
    owners = dp.spend(DpConfig(enabled=True, target_epsilon=8.0), [400, 800], cfg)
    assert owners.noise_multiplier == calibrated.noise_multiplier and len(owners.slots) == 2
    assert owners.slots[0] < owners.slots[1]
    micro = dp.spend(DpConfig(enabled=True, target_epsilon=8.0, num_microbatches=4), 1200, cfg)
    assert sum(micro.slots) % 8 == 0 and micro.sensitivity == 2 * calibrated.sensitivity


def test_dp_training_without_clipping_or_noise_is_plain_training():
    """The plumbing: with C far above every norm, no noise and sample rate 1 (every example
    drawn, in random slots), DP-SGD (per example or in microbatches) is full-batch training."""
    x, mask, y = _batch(n=10, seed=4)
    data = train.Dataset(x, mask, y)
    params = head_def.init_params(HEAD, D_IN, 2, seed=1)
    cfg = TrainConfig(epochs=3, batch_size=10, lr=0.1, momentum=0.9, weight_decay=0.01, seed=3)
    plain, _ = train.train(params, data, head=HEAD, train_cfg=cfg, ops=TorchOps,
                           reveal_scalars=train.plaintext_reveal)  # fmt: skip
    for microbatches in (0, 2):
        run = dp.DpRun(DpConfig(enabled=True, max_grad_norm=1e4, num_microbatches=microbatches),
                       parties=2)  # fmt: skip
        with pytest.warns(UserWarning, match="NO differential-privacy"):
            private, history = train.train(
                params, data, head=HEAD, train_cfg=cfg, ops=TorchOps,
                reveal_scalars=train.plaintext_reveal, dp=run,
            )  # fmt: skip
        assert history.loss == [] and history.steps == 3
        for name in plain:
            torch.testing.assert_close(private[name], plain[name], atol=1e-4, rtol=1e-3)


def test_dp_config_is_checked():
    from tests.test_mpc_training import _job

    job = _job(2)
    with pytest.raises(BadInput, match="not both"):
        job.replace(dp={"enabled": True, "target_epsilon": 8.0, "noise_multiplier": 1.0})
    with pytest.raises(BadInput, match="must divide"):
        job.replace(dp={"enabled": True, "num_microbatches": 5})


def test_report_carries_the_dp_keys_and_no_training_loss(tmp_path):
    from mpc_ft import report
    from tests.test_report import make_report

    privacy = dp.spend(DpConfig(enabled=True, target_epsilon=8.0), 1200, TrainConfig(epochs=3))
    rep = make_report(epochs=3) | dp.report_keys(privacy.as_dict())
    rep |= {"loss_mpc": [], "loss_plaintext": []}  # DP: nothing revealed during training
    report.write_report(rep, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["dp_epsilon"] == privacy.epsilon <= 8.0 and saved["dp_delta"] == 1e-5
    assert saved["noise_multiplier"] == privacy.noise_multiplier > 0
    assert saved["max_grad_norm"] == 1.0 and saved["dp_steps"] == privacy.steps
    assert "DP epsilon" in report.summary_table(rep)
    report.plot_losses(rep, tmp_path)
    with pytest.raises(ValueError, match="loss_mpc"):  # without DP, losses stay required
        report.validate_report(rep | dp.report_keys(None))


def test_demo_flag_makes_a_dp_job():
    from mpc_ft.cli import _parser
    from mpc_ft.launch import DemoOptions, build_job

    args = _parser().parse_args(["demo", "--dp-epsilon", "8", "--dp-microbatches", "8"])
    opts = DemoOptions(dp_epsilon=args.dp_epsilon, dp_microbatches=args.dp_microbatches)
    job = build_job(opts, ("neg", "pos"))
    assert job.dp == DpConfig(enabled=True, target_epsilon=8.0, num_microbatches=8,
                              max_grad_norm=0.1)  # fmt: skip
    assert job.train.lr == 0.5 and job.train.batch_size == 128  # DP's chosen settings (README)
    plain = build_job(DemoOptions(), ("neg", "pos"))
    assert not plain.dp.enabled and plain.train.lr == 0.02


@pytest.mark.slow
def test_dp_demo_end_to_end(tmp_path):
    """mpc-ft demo --dp-epsilon 8: the report states the guarantee; nothing data-dependent is
    revealed during training beyond the watchdog's check of the (already noised) parameters."""
    from tests.test_demo import _demo

    rep = _demo(tmp_path, "--train-size", "40", "--test-size", "20", "--dp-epsilon", "8",
                "--dp-microbatches", "8")  # fmt: skip
    assert 7.0 < rep["dp_epsilon"] <= 8.0 and rep["dp_delta"] == 1e-5
    assert rep["noise_multiplier"] > 0 and rep["max_grad_norm"] == 0.1
    assert rep["steps"] == 1 and rep["dp_steps"] == 1 + 2 * 10 == 1 + rep["dp_spare_steps"]
    assert rep["dp_sample_rate"] == 1.0
    assert rep["dp_slots"] == [20, 28]  # all 40 examples, slots filled to whole microbatches of 16
    assert rep["loss_mpc"] == [] == rep["loss_plaintext"]
    assert [r["what"] for r in rep["reveals"]] == ["watchdog step 1", "test accuracy",
                                                   "trained head"]  # fmt: skip


def test_under_dp_the_watchdog_rolls_back_only_as_often_as_the_accountant_counted():
    """A DP run may roll back dp.ROLLBACKS times in all (the accountant counts the steps they may
    repeat: ROLLBACKS x watchdog_every more), then stops; without DP each failure may be
    retried twice, however many there are."""
    from mpc_ft import watchdog

    x, mask, y = _batch(n=8, seed=5)
    data = train.Dataset(x, mask, y)
    params = head_def.init_params(HEAD, D_IN, 2, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e9, momentum=0.0, seed=3, watchdog_every=1)
    seen = []

    def reveal(values, what):
        seen.append(what)
        return train.plaintext_reveal(values, what)

    run = dp.DpRun(DpConfig(enabled=True, max_grad_norm=1.0, noise_multiplier=1.0), parties=2)
    privacy = dp.spend(run.config, 8, cfg)
    assert privacy.rollbacks == dp.ROLLBACKS == 2 and privacy.spare_steps == 2
    assert privacy.steps == 2 + 2  # 2 steps of the run, 2 that rollbacks may repeat
    with pytest.raises(watchdog.Overflow, match="at step 1, again after 2 rollback"):
        train.train(params, data, head=HEAD, train_cfg=cfg, ops=TorchOps,
                    reveal_scalars=reveal, dp=run)  # fmt: skip
    assert seen.count("watchdog step 1") == 6  # three tries of count and flags
    seen.clear()
    with pytest.raises(watchdog.Overflow, match="again after 2 rollback"):
        train.train(params, data, head=HEAD, train_cfg=cfg, ops=TorchOps, reveal_scalars=reveal)
    assert seen.count("watchdog step 1") == 6


def test_dp_rollbacks_are_counted_over_the_whole_run():
    """Two failures far apart: without DP each gets its retries; under DP the second one
    exceeds the run's budget of rollbacks if the first used it up."""
    from mpc_ft import watchdog

    x, mask, y = _batch(n=8, seed=5)
    data = train.Dataset(x, mask, y)
    params = head_def.init_params(HEAD, D_IN, 2, seed=1)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.1, momentum=0.0, seed=3, watchdog_every=1)
    failures = {"watchdog step 2": 2, "watchdog step 5": 1}  # fail the first n checks there

    def reveal(values, what):  # a failed check: the count 1, then the first tensor's flag
        if failures.get(what, 0) > 0:
            if len(values) > 1:
                failures[what] -= 1
            return [1.0] + [0.0] * (len(values) - 1)
        return train.plaintext_reveal(values, what)

    run = dp.DpRun(DpConfig(enabled=True, max_grad_norm=1.0, noise_multiplier=1.0), parties=2)
    with pytest.raises(watchdog.Overflow, match="at step 5"):
        train.train(params, data, head=HEAD, train_cfg=cfg, ops=TorchOps,
                    reveal_scalars=reveal, dp=run)  # fmt: skip
    failures.update({"watchdog step 2": 2, "watchdog step 5": 1})
    _, history = train.train(params, data, head=HEAD, train_cfg=cfg, ops=TorchOps,
                             reveal_scalars=reveal)  # fmt: skip
    assert history.rollbacks == 3 and history.steps == 6
