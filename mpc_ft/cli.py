"""The `mpc-ft` command.

    mpc-ft demo [--out DIR] [--data-owners N] [--dataset FILE] [--test-dataset FILE]
                [--backbone DIR] [--train-size N] [--test-size N] [--epochs N]
                [--max-tokens N] [--layer N] [--seed N] [--separate-model-owner]
    mpc-ft party --job JOB.toml --party NAME [--data FILE] [--test-data FILE] [--out DIR]

Exit codes: 0 success; 2 bad input or configuration (one line on stderr); 3 a peer failed or
timed out; 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

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
    demo.add_argument("--cache", type=Path, help="feature cache (default: next to --out)")
    demo.add_argument("--no-progress", action="store_true")

    party = sub.add_parser("party", help="run one party of a job (one process per host)")
    party.add_argument("--job", type=Path, required=True)
    party.add_argument("--party", required=True)
    party.add_argument("--data", type=Path)
    party.add_argument("--test-data", type=Path)
    party.add_argument("--out", type=Path, default=Path("runs/party"))
    party.add_argument("--cache", type=Path)
    party.add_argument("--progress", action="store_true")
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
            cache_dir=args.cache,
            progress=not args.no_progress,
        )
    )


def _party(args: argparse.Namespace) -> None:
    from mpc_ft.config import load_job
    from mpc_ft.party import PartyFiles, run

    job = load_job(args.job)
    files = PartyFiles(
        out_dir=args.out,
        data=args.data,
        test_data=args.test_data,
        cache_dir=args.cache or args.out / "cache",
        progress=args.progress,
    )
    run(job, args.party, files)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1) if args.command == "party" else None
        {"demo": _demo, "party": _party}[args.command](args)
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
