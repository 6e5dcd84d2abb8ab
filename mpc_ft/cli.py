"""The `mpc-ft` command.

    mpc-ft demo [--out DIR] [--data-owners N] [--dataset FILE] [--test-dataset FILE]
                [--backbone DIR] [--train-size N] [--test-size N] [--epochs N]
                [--max-tokens N] [--layer N] [--seed N] [--head exact|native]
                [--separate-model-owner] [--mode mpc|federated] [--rounds R]
                [--local-epochs E]
    mpc-ft party --job JOB.toml --party NAME [--private FILE] [--data FILE] [--test-data FILE]
                 [--token-file FILE] [--backbone DIR] [--interface IFACE] [--out DIR]
                 [--resume]
    mpc-ft infer --client NAME  (then the same options as party: every party, --data only for
                 the client; private inference with the shares of the head trained with --out)
    mpc-ft sample-data --owners alice,bob [--out DIR] [--train-size N] [--test-size N]
    mpc-ft token [--out FILE]          # a fresh job token, shared by every party of one job
    mpc-ft rank --job JOB.toml --party NAME    # the party's rank (torchrun's --node-rank)

Exit codes: 0 success; 2 bad input or configuration (one line on stderr); 3 a peer failed or
timed out; 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from mpc_ft.errors import BadInput, PeerFailure


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too (exit 2), not argparse's usage block then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mpc-ft: error: {message} (see: {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpc-ft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="local multi-party fine-tuning, one process per party")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--data-owners", type=int, default=2)
    demo.add_argument(
        "--separate-model-owner",
        action="store_true",
        help="the model owner holds no data (default: bob owns data and model)",
    )
    demo.add_argument("--dataset", type=Path, help="CSV (text,label header) or JSONL")
    demo.add_argument("--test-dataset", type=Path)
    demo.add_argument("--backbone", default="default", help="local Hugging Face model directory")
    demo.add_argument("--train-size", type=int, default=1200)
    demo.add_argument("--test-size", type=int, default=600)
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument(
        "--layer",
        type=int,
        help="backbone hidden layer (default: 4 for the packaged MiniLM, the last layer otherwise)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--head",
        choices=("exact", "native"),
        default="native",
        help="the MPC-native head (default: as accurate here, 2.5x cheaper) or the exact "
        "transformer head (README: 'Exact and MPC-native heads')",
    )
    demo.add_argument(
        "--mode",
        choices=("mpc", "federated"),
        default="mpc",
        help="mpc: the whole training on shares (default); federated: FedAvg rounds of local "
        "plaintext training, updates averaged under MPC (README: 'Federated mode')",
    )
    demo.add_argument("--rounds", type=int, default=3, help="federated rounds (--mode federated)")
    demo.add_argument(
        "--local-epochs", type=int, default=1, help="local epochs per round (--mode federated)"
    )
    demo.add_argument("--cache", type=Path, help="feature cache (default: next to --out)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument(
        "--dp-epsilon",
        type=float,
        default=0.0,
        help="DP-SGD on shares: calibrate the noise to this epsilon (delta 1e-5)",
    )
    demo.add_argument(
        "--dp-microbatches",
        type=int,
        default=0,
        help="DP microbatches per batch (default: per-example clipping)",
    )
    demo.add_argument(
        "--dp-max-grad-norm",
        type=float,
        default=0.1,
        help="DP clipping norm C (DP runs train at lr 0.5, batches of 128: README)",
    )

    party = sub.add_parser("party", help="run one party of a job (one process per host)")
    infer = sub.add_parser(
        "infer",
        help="private inference with the trained head's shares: "
        "only --client learns its texts' labels (one process per party)",
    )
    for command in (party, infer):
        command.add_argument("--job", type=Path, required=True, help="the public job file")
        command.add_argument("--party", required=True, help="this party's name in the job file")
        command.add_argument("--private", type=Path, help="this party's private TOML file (below)")
        command.add_argument("--data", type=Path, help="training data, CSV or JSONL (data owners)")
        command.add_argument("--test-data", type=Path)
        command.add_argument("--token-file", type=Path, help="the job token (else $MPC_FT_TOKEN)")
        command.add_argument("--backbone", help="this host's copy of the job's backbone")
        command.add_argument("--interface", help="network interface to bind (GLOO_SOCKET_IFNAME)")
        command.add_argument("--out", type=Path, help="output directory (default runs/party)")
        command.add_argument("--cache", type=Path, help="feature cache (default OUT/cache)")
        command.add_argument("--progress", action="store_true")
        command.add_argument(
            "--resume",
            action="store_true",
            help="continue from the newest checkpoint every party holds (all parties)",
        )
    party.add_argument(
        "--init-seed",
        type=int,
        help="model owner: seed of the initial head "
        "(default: a fresh secret one; the demo passes train.seed for its twin)",
    )
    infer.add_argument(
        "--client",
        required=True,
        help="the computing party that classifies its texts (gives --data)",
    )

    sample = sub.add_parser("sample-data", help="the demo's data, one shard per data owner")
    sample.add_argument("--owners", required=True, help="comma-separated data owner names")
    sample.add_argument("--out", type=Path, default=Path("data"))
    sample.add_argument("--dataset", type=Path, help="CSV or JSONL (default: Rotten Tomatoes)")
    sample.add_argument("--train-size", type=int, default=1200)
    sample.add_argument("--test-size", type=int, default=600)
    sample.add_argument("--seed", type=int, default=0)

    token = sub.add_parser("token", help="print (or write) a fresh job token")
    token.add_argument("--out", type=Path, help="write it to this file (mode 0600)")

    rank = sub.add_parser("rank", help="a party's rank in a job (torchrun --node-rank)")
    rank.add_argument("--job", type=Path, required=True)
    rank.add_argument("--party", required=True)
    return parser  # fmt: skip


def _demo(args: argparse.Namespace) -> None:
    from mpc_ft.launch import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            out=args.out,
            data_owners=args.data_owners,
            separate_model_owner=args.separate_model_owner,
            dataset=args.dataset,
            test_dataset=args.test_dataset,
            backbone=str(Path(args.backbone).resolve())
            if args.backbone != "default"
            else "default",
            train_size=args.train_size,
            test_size=args.test_size,
            epochs=args.epochs,
            max_tokens=args.max_tokens,
            layer=args.layer,
            seed=args.seed,
            head=args.head,
            cache_dir=args.cache,
            progress=not args.no_progress,
            mode=args.mode,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            dp_epsilon=args.dp_epsilon,
            dp_microbatches=args.dp_microbatches,
            dp_max_grad_norm=args.dp_max_grad_norm,
        )
    )


def _party(args: argparse.Namespace) -> None:
    from mpc_ft import compat, handshake
    from mpc_ft.config import PrivateConfig, load_job, load_private

    if not compat.crypten_available():
        raise ImportError(compat.INSTALL_HINT)
    from mpc_ft.party import PartyFiles, run

    job = load_job(args.job)
    try:
        job.party(args.party)  # unknown name: BadInput before anything else
    except BadInput as e:
        raise BadInput(f"{args.job}: {e}") from None
    private = load_private(args.private) if args.private else PrivateConfig()

    def pick(flag: object, key: str) -> str | None:
        return str(flag) if flag else (getattr(private, key) or None)

    out = Path(pick(args.out, "out") or "runs/party")
    token_file = pick(args.token_file, "token_file")
    files = PartyFiles(
        out_dir=out,
        data=Path(d) if (d := pick(args.data, "data")) else None,
        test_data=Path(d) if (d := pick(args.test_data, "test_data")) else None,
        cache_dir=Path(pick(args.cache, "cache") or out / "cache"),
        progress=args.progress,
        token=handshake.read_token(Path(token_file) if token_file else None),
        backbone=pick(args.backbone, "backbone"),
        interface=pick(args.interface, "interface"),
        resume=args.resume,
        init_seed=_init_seed(args, private),
        infer_client=getattr(args, "client", None),
    )
    run(job, args.party, files)


def _init_seed(args: argparse.Namespace, private: Any) -> int:
    flag = getattr(args, "init_seed", None)
    return flag if flag is not None else private.init_seed


def _sample_data(args: argparse.Namespace) -> None:
    from mpc_ft.launch import DemoOptions, write_sample_data

    opts = DemoOptions(dataset=args.dataset, train_size=args.train_size,
                       test_size=args.test_size, seed=args.seed)  # fmt: skip
    for path in write_sample_data(opts, args.owners.split(","), args.out):
        print(path)


def _token(args: argparse.Namespace) -> None:
    from mpc_ft.handshake import new_token

    token = new_token()
    if args.out is None:
        print(token)
        return
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadInput(f"--out {args.out}: exists; a job token is never overwritten") from None
    except OSError as e:
        raise BadInput(f"--out {args.out}: cannot create it ({e.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"wrote a new job token to {args.out}: give every party of the job a copy",
          file=sys.stderr)  # fmt: skip


def _rank(args: argparse.Namespace) -> None:
    from mpc_ft.config import load_job

    job = load_job(args.job)
    print(job.rank(args.party))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1) if args.command in ("party", "infer") else None
        commands = {"demo": _demo, "party": _party, "infer": _party, "token": _token, "rank": _rank,
                    "sample-data": _sample_data}  # fmt: skip
        commands[args.command](args)
    except BadInput as e:
        print(f"mpc-ft: error: {e}", file=sys.stderr)
        return 2
    except PeerFailure as e:
        print(f"mpc-ft: peer failure: {e}", file=sys.stderr)
        return 3
    except ImportError as e:
        if "crypten" in str(e).lower():
            print(f"mpc-ft: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("mpc-ft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
