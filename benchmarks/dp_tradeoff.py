"""Accuracy against epsilon for DP-SGD (dp.py) on Rotten Tomatoes: the demo's data and head.

    .venv/bin/python -m benchmarks.dp_tradeoff          # -> benchmarks/plots/dp_tradeoff.*
    .venv/bin/python -m benchmarks.dp_tradeoff --mpc 8    # + MPC runs without DP and at epsilon 8
    .venv/bin/python -m benchmarks.dp_tradeoff --select 8 # how the settings were chosen

The demo's data (1,200 training examples stratified from the training movies, held by two
owners; 600 held-out), all-MiniLM-L6-v2 layer 4, the MPC-native head, delta 1e-5, 3 seeds.
Under DP: the plaintext twin runs the same DP-SGD code as the parties (oblivious Poisson batches
of expected size 128 in the two owners' slots, per-example clipping at C 0.1, the P = 2 parties'
joint noise, the accountant; lr 0.5, 16 epochs) for several target epsilons; without DP the
usual training (batch 32, lr 0.02, 4 epochs). These settings were chosen by --select on a
validation split of the training movies (the test set untouched). --mpc E adds seed 0 on shares,
without DP and at epsilon E (about half an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mpc_ft import backbone, train
from mpc_ft import data as data_lib
from mpc_ft import head as head_def
from mpc_ft.config import NATIVE_HEAD, DpConfig, HeadConfig, TrainConfig
from mpc_ft.dp import DpRun, spend
from mpc_ft.ops import MpcOps, TorchOps
from mpc_ft.sampling import PoissonBatches

HERE = Path(__file__).parent
HEAD = HeadConfig(**NATIVE_HEAD)


def rotten_tomatoes(
    train_size: int, test_size: int, validation: bool = False
) -> tuple[list[train.Dataset], train.Dataset]:
    """The demo's data exactly (launch.prepare_data): the training set as its two owners
    (alice, bob) hold it, and the pooled held-out set. validation: both drawn from the demo's
    TRAINING movies instead, split again by movie (for choosing settings without the test set)."""
    from mpc_ft.launch import DemoOptions, prepare_data

    opts = DemoOptions(train_size=train_size, test_size=test_size)
    texts, held_out, _ = prepare_data(opts)
    if validation:
        pool = data_lib.split_by_group(data_lib.load_rotten_tomatoes(), 0.2, seed=opts.seed)[0]
        texts, held_out = data_lib.split_by_group(pool, test_fraction=0.2, seed=opts.seed + 1)
        texts = data_lib.stratified_sample(texts, train_size, opts.seed)
        held_out = data_lib.stratified_sample(held_out, test_size, opts.seed)
    labels = data_lib.label_names(texts)
    out = []
    for part in (texts, held_out):
        pieces = []
        for shard in data_lib.shard(part, 2, 0):
            x, mask = backbone.extract_features(
                shard.texts, backbone=backbone.default_backbone_path(), layer=4,
                max_tokens=32, cache_dir=HERE / ".cache", progress=False,
            )  # fmt: skip
            y = data_lib.one_hot(data_lib.encode_labels(shard, labels), len(labels))
            pieces.append(train.Dataset.counted(x, mask, y))
        out.append(pieces)
    test = train.Dataset(*(torch.cat([getattr(p, f) for p in out[1]])
                           for f in ("x", "mask", "y", "inv_count")))  # fmt: skip
    return out[0], test


def twin(data, cfg: TrainConfig, dp: DpConfig | None) -> tuple[float, dict | None]:
    """The twin: without DP on the pooled data (public order); with DP on the owners' Poisson
    batches (sampling.py), the same slots as under MPC."""
    owners, test = data
    params = head_def.init_params(HEAD, test.x.size(2), 2, cfg.seed)
    source, run = train.Dataset.concat(owners), None
    if dp:
        privacy = spend(dp, [len(o) for o in owners], cfg)
        source = PoissonBatches.plain(owners, privacy.slots, privacy.sample_rate, seed=cfg.seed)
        run = DpRun(dp, parties=2)
    params, history = train.train(params, source, head=HEAD, train_cfg=cfg, ops=TorchOps,
                                  reveal_scalars=train.plaintext_reveal, dp=run)  # fmt: skip
    accuracy = train.evaluate(params, test, head=HEAD, batch_size=256, ops=TorchOps,
                              reveal_scalars=train.plaintext_reveal)  # fmt: skip
    return accuracy, history.privacy


def _mpc_party(rank, data, cfg, dp):
    """alice (rank 0) and bob (rank 1) own the training halves (bob also the model); under DP
    each shares its own Poisson batches, without DP both halves are shared up front."""
    import crypten

    from mpc_ft.sharing import share

    owners, test = data
    ops = MpcOps(crypten)

    def share_all(d: train.Dataset, src: int) -> train.Dataset:
        return train.Dataset(*(share(crypten, t, tuple(t.shape), src)
                               for t in (d.x, d.mask, d.y, d.inv_count)))  # fmt: skip

    shared_test = share_all(test, 0)
    init = head_def.init_params(HEAD, test.x.size(2), 2, cfg.seed)
    params = {k: share(crypten, v, tuple(v.shape), 1) for k, v in init.items()}
    if dp:
        privacy = spend(dp, [len(o) for o in owners], cfg)
        source = PoissonBatches(
            [(r, len(o), o if r == rank else None) for r, o in enumerate(owners)],
            privacy.slots, privacy.sample_rate, (test.x.size(1), test.x.size(2), 2),
            share=lambda v, shape, src: share(crypten, v, shape, src),
        )  # fmt: skip
    else:
        halves = [share_all(o, r) for r, o in enumerate(owners)]
        source = train.Dataset(*(crypten.cat([getattr(h, f) for h in halves])
                                 for f in ("x", "mask", "y", "inv_count")))  # fmt: skip

    def reveal(values, what):
        return [float(v) for v in crypten.stack([v.reshape(1) for v in values]).get_plain_text()]

    start = time.perf_counter()
    params, history = train.train(
        params,
        source,
        head=HEAD,
        train_cfg=cfg,
        ops=ops,
        reveal_scalars=reveal,
        dp=DpRun(dp, parties=2) if dp else None,
    )
    seconds = time.perf_counter() - start
    accuracy = train.evaluate(params, shared_test, head=HEAD, batch_size=256, ops=ops,
                              reveal_scalars=reveal)  # fmt: skip
    return accuracy, history.privacy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--test-size", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.5, help="DP-SGD's learning rate")
    parser.add_argument("--baseline-lr", type=float, default=0.02, help="without DP (the demo's)")
    parser.add_argument("--baseline-epochs", type=int, default=4, help="without DP")
    parser.add_argument("--baseline-batch-size", type=int, default=32, help="without DP")
    parser.add_argument("--epochs", type=int, default=16, help="under DP")
    parser.add_argument("--batch-size", type=int, default=128, help="under DP (expected)")
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument("--microbatches", type=int, default=0, help="per batch; 0: per example")
    parser.add_argument("--mpc", type=float, default=0.0, help="also one MPC run at this epsilon")
    parser.add_argument(
        "--select",
        type=float,
        default=0.0,
        help="instead: try SELECT_GRID at this epsilon on a validation split",
    )
    parser.add_argument("--no-twin", action="store_true", help="only the --mpc runs")
    parser.add_argument("--out", type=Path, default=HERE / "plots" / "dp_tradeoff.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.select:
        select(args)
        return
    data = rotten_tomatoes(args.train_size, args.test_size)
    rows = []

    def cfg(seed: int, dp: bool = True) -> TrainConfig:
        if dp:
            return TrainConfig(seed=seed, lr=args.lr, epochs=args.epochs,
                               batch_size=args.batch_size)  # fmt: skip
        return TrainConfig(seed=seed, lr=args.baseline_lr, epochs=args.baseline_epochs,
                           batch_size=args.baseline_batch_size)  # fmt: skip

    def dp_cfg(eps: float) -> DpConfig:
        return DpConfig(enabled=True, target_epsilon=eps, max_grad_norm=args.max_grad_norm,
                        num_microbatches=args.microbatches)  # fmt: skip

    for eps in [] if args.no_twin else [None, *args.epsilons]:
        start = time.perf_counter()
        results = [twin(data, cfg(s, bool(eps)), dp_cfg(eps) if eps else None) for s in args.seeds]
        accs = [a for a, _ in results]
        row = {"backend": "twin", "target_epsilon": eps, "accuracies": accs,
               "accuracy_mean": statistics.mean(accs), "privacy": results[0][1],
               "seconds": time.perf_counter() - start}  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "privacy"}), flush=True)
        rows.append(row)
    if args.mpc:  # the same seed on shares: without DP (the baseline), then at epsilon E
        from mpc_ft.multiparty import run_multiparty

        for eps in (None, args.mpc):
            seed = args.seeds[0]
            acc, privacy, seconds = run_multiparty(
                _mpc_party, parties=2, timeout_s=4 * 3600,
                args=(data, cfg(seed, bool(eps)), dp_cfg(eps) if eps else None),
            )[0]  # fmt: skip
            row = {"backend": "mpc", "target_epsilon": eps, "accuracies": [acc], "seed": seed,
                   "accuracy_mean": acc, "privacy": privacy, "seconds": seconds}  # fmt: skip
            print(json.dumps({k: v for k, v in row.items() if k != "privacy"}), flush=True)
            rows.append(row)
    setting = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": setting, "rows": rows}, indent=2, default=str))
    if any(r["backend"] == "twin" for r in rows):
        plot(rows, args.out.with_suffix(".png"))


# (batch size, epochs, lr, C) tried by --select; C None: without DP
SELECT_GRID = [
    *((32, e, lr, None) for e in (2, 4, 8) for lr in (0.02, 0.05)),
    *((32, 4, lr, c) for lr, c in ((0.15, 0.2), (0.3, 0.1), (0.6, 0.05))),
    *((64, 8, lr, c) for lr, c in ((0.5, 0.1), (0.8, 0.1), (1.0, 0.05), (2.0, 0.025))),
    *((128, 16, lr, c) for lr, c in ((0.5, 0.1), (1.0, 0.1), (2.0, 0.05))),
]


def select(args: argparse.Namespace) -> None:
    """Mean validation accuracy over --seeds of every SELECT_GRID setting; the test set is not
    touched. Written to benchmarks/plots/dp_select.json."""
    data = rotten_tomatoes(args.train_size, args.test_size, validation=True)
    rows = []
    for batch, epochs, lr, c in SELECT_GRID:
        dp = None if c is None else DpConfig(enabled=True, target_epsilon=args.select,
                                             max_grad_norm=c)  # fmt: skip
        accs = [twin(data, TrainConfig(seed=s, lr=lr, epochs=epochs, batch_size=batch), dp)[0]
                for s in args.seeds]  # fmt: skip
        row = {"batch_size": batch, "epochs": epochs, "lr": lr, "max_grad_norm": c,
               "epsilon": args.select if c else None, "accuracies": accs,
               "accuracy_mean": statistics.mean(accs)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        out = HERE / "plots" / "dp_select.json"  # after every row: a partial run keeps its rows
        setting = {k: v for k, v in vars(args).items() if k != "out"}
        out.write_text(json.dumps({"setting": setting, "rows": rows}, indent=2))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if r["backend"] == "twin" and r["target_epsilon"]]
    base = next(r for r in rows if r["target_epsilon"] is None)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    eps = [r["privacy"]["epsilon"] for r in dp_rows]
    ax.plot(eps, [100 * r["accuracy_mean"] for r in dp_rows], "o-", label="DP-SGD (twin)")
    for r in dp_rows:
        ax.scatter([r["privacy"]["epsilon"]] * len(r["accuracies"]),
                   [100 * a for a in r["accuracies"]], s=8, color="grey")  # fmt: skip
    ax.axhline(100 * base["accuracy_mean"], ls="--", color="k", label="no DP (twin)")
    ax.axhspan(100 * base["accuracy_mean"] - 3, 100 * base["accuracy_mean"], color="g", alpha=0.1,
               label="within 3 points")  # fmt: skip
    for r in rows:
        if r["backend"] == "mpc" and r["target_epsilon"]:
            ax.plot(
                [r["privacy"]["epsilon"]],
                [100 * r["accuracy_mean"]],
                "r*",
                ms=12,
                label=f"DP-SGD under MPC (seed {r['seed']})",
            )
        elif r["backend"] == "mpc":
            ax.axhline(100 * r["accuracy_mean"], ls=":", color="r",
                       label=f"no DP, under MPC (seed {r['seed']})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Rotten Tomatoes: accuracy vs. privacy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
