"""The local launcher: one OS process per party on loopback, then the plaintext twin, a report.

    mpc-ft demo        # defaults: Rotten Tomatoes, all-MiniLM-L6-v2, alice + bob + the dealer
    mpc-ft demo --data-owners 3 --epochs 3 --train-size 4000

Each party runs exactly what a host of a multi-node job runs (`mpc-ft party --job ... --party
NAME`), from a job file this launcher writes; only the launcher differs. It alone sees every
party's data, which is legitimate here (one machine, one user), so it also trains the plaintext
twin on the same features, initial head and batch order, for the comparison in report.json.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from mpc_ft import data as data_lib
from mpc_ft.config import NATIVE_HEAD, BackboneConfig, JobConfig, PartyConfig, job_from_dict
from mpc_ft.errors import BadInput, PeerFailure
from mpc_ft.multiparty import free_port

# DP-SGD's clipped, noised steps want larger batches and rate; chosen on a validation split by
# benchmarks/dp_tradeoff.py --select (README "Differential privacy", with 16 epochs)
DP_TRAIN = {"lr": 0.5, "batch_size": 128}
OWNER_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("runs/demo")
    data_owners: int = 2
    separate_model_owner: bool = False
    dataset: Path | None = None
    test_dataset: Path | None = None
    backbone: str = "default"
    train_size: int = 1200
    test_size: int = 600
    epochs: int = 2
    max_tokens: int = 32
    layer: int | None = None  # None: 4 for the packaged MiniLM (measured best), else the last
    seed: int = 0
    head: str = "native"  # the MPC-native head (config.NATIVE_HEAD), or "exact"
    dp_epsilon: float = 0.0  # > 0: DP-SGD on shares calibrated to this epsilon (dp.py)
    dp_microbatches: int = 0  # DP microbatches per batch; 0: per-example clipping
    dp_max_grad_norm: float = 0.1  # with DP_TRAIN: benchmarks/dp_tradeoff.py (README)
    cache_dir: Path | None = None
    progress: bool = True
    mode: str = "mpc"  # or "federated": FedAvg rounds with MPC secure aggregation
    rounds: int = 3  # federated mode
    local_epochs: int = 1  # federated mode


def demo_parties(data_owners: int, separate_model_owner: bool) -> tuple[PartyConfig, ...]:
    """alice (data owner), bob (data owner and model owner), ... and the dealer."""
    if not 1 <= data_owners <= len(OWNER_NAMES):
        raise BadInput(f"--data-owners {data_owners}: choose 1 to {len(OWNER_NAMES)}")
    parties = []
    for i, name in enumerate(OWNER_NAMES[:data_owners]):
        roles = ["data_owner"]
        if not separate_model_owner and i == min(1, data_owners - 1):
            roles.append("model_owner")
        parties.append(PartyConfig(name=name, roles=tuple(roles)))
    if separate_model_owner or data_owners == 1:
        if data_owners == 1:  # MPC needs two computing parties: add a model owner without data
            parties[0] = PartyConfig(name=parties[0].name, roles=("data_owner",))
        parties.append(PartyConfig(name="olivia", roles=("model_owner",)))
    parties.append(PartyConfig(name="dealer", roles=("dealer",)))
    return tuple(parties)


def prepare_data(opts: DemoOptions) -> tuple[data_lib.LabelledTexts, data_lib.LabelledTexts, str]:
    """Train and test sets, validated, before anything is written."""
    if opts.dataset is None:
        if opts.test_dataset is not None:
            raise BadInput("--test-dataset needs --dataset")
        full = data_lib.load_rotten_tomatoes()
        train, test = data_lib.split_by_group(full, test_fraction=0.2, seed=opts.seed)
        name = "rotten_tomatoes"
    else:
        train = data_lib.read_labelled_file(opts.dataset)
        data_lib.require_classes(train)
        if opts.test_dataset is None:
            train, test = data_lib.stratified_split(train, test_fraction=0.2, seed=opts.seed)
        else:
            test = data_lib.read_labelled_file(opts.test_dataset)
            data_lib.encode_labels(test, data_lib.label_names(train))  # unknown label -> BadInput
        name = str(opts.dataset)
    for flag, value in (("--train-size", opts.train_size), ("--test-size", opts.test_size)):
        if value < 1:
            raise BadInput(f"{flag} {value}: must be at least 1")
    train = data_lib.stratified_sample(train, opts.train_size, opts.seed)
    test = data_lib.stratified_sample(test, opts.test_size, opts.seed)
    return train, test, name


def write_sample_data(opts: DemoOptions, owners: list[str], out: Path) -> list[Path]:
    """The demo's data, sharded for named owners: OUT/<owner>.train.jsonl and .test.jsonl.

    For trying `mpc-ft party` by hand; every file is checked for before any is written."""
    names = [n.strip() for n in owners if n.strip()]
    if not names or len(set(names)) != len(names):
        raise BadInput(f"--owners {','.join(owners)}: give distinct names, comma-separated")
    train, test, _ = prepare_data(opts)
    files = {(n, part): out / f"{n}.{part}.jsonl" for n in names for part in ("train", "test")}
    existing = [str(f) for f in files.values() if f.exists()]
    if existing:
        raise BadInput(f"{existing[0]}: exists; sample data never overwrites a file")
    out.mkdir(parents=True, exist_ok=True)
    for part, texts in (("train", train), ("test", test)):
        for name, piece in zip(names, data_lib.shard(texts, len(names), opts.seed), strict=True):
            data_lib.write_jsonl(piece, files[name, part])
    return list(files.values())


def build_job(
    opts: DemoOptions, labels: tuple[str, ...], train_examples: int | None = None
) -> JobConfig:
    """The demo's job; train_examples: the total actually dealt (default opts.train_size)."""
    if opts.head not in ("exact", "native"):
        raise BadInput(f"--head {opts.head}: choose exact or native")
    federated = {}
    if opts.mode == "federated":  # the launcher knows the total; the range is public, loose
        n = train_examples or opts.train_size
        federated = {"rounds": opts.rounds, "local_epochs": opts.local_epochs,
                     "min_examples": max(1, n // 4), "max_examples": 4 * n}  # fmt: skip
    parties = demo_parties(opts.data_owners, opts.separate_model_owner)
    layer = opts.layer
    if layer is None:
        layer = BackboneConfig.layer if opts.backbone == "default" else -1
    return job_from_dict(
        {
            "name": "demo",
            "labels": list(labels),
            "parties": [{"name": p.name, "roles": list(p.roles), "host": p.host} for p in parties],
            "backbone": {"path": opts.backbone, "max_tokens": opts.max_tokens, "layer": layer},
            "train": {"epochs": opts.epochs, "seed": opts.seed, "mode": opts.mode}
            | (DP_TRAIN if opts.dp_epsilon else {}),
            "federated": federated,
            "head": NATIVE_HEAD if opts.head == "native" else {},
            "mpc": {"rendezvous": f"tcp://127.0.0.1:{free_port()}"},
            "dp": _dp_section(opts),
        },
        where="demo options",
    )


def _dp_section(opts: DemoOptions) -> dict[str, Any]:
    if opts.dp_epsilon < 0:
        raise BadInput(f"--dp-epsilon {opts.dp_epsilon}: must be positive (0: no DP)")
    if not opts.dp_epsilon:
        return {}
    return {
        "enabled": True,
        "target_epsilon": opts.dp_epsilon,
        "num_microbatches": opts.dp_microbatches,
        "max_grad_norm": opts.dp_max_grad_norm,
    }


def _pump(stream: IO[bytes], sinks: list[IO[bytes]]) -> None:
    for chunk in iter(lambda: stream.read1(4096), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()


def run_parties(job: JobConfig, commands: dict[str, list[str]], logs: Path) -> None:
    """Start every party, show the first computing party's progress, stop all if one fails.

    The parties share a fresh job token (handshake.py) through their environment."""
    from mpc_ft.handshake import TOKEN_ENV, new_token

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{TOKEN_ENV: new_token()})
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    pumps = []
    shown = job.compute_parties[0].name
    try:
        for name, cmd in commands.items():
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed when the pump ends
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            sinks = [log] + ([sys.stderr.buffer] if name == shown else [])
            pump = threading.Thread(target=_pump, args=(proc.stdout, sinks), daemon=True)
            pump.start()
            procs[name], pumps = proc, pumps + [(pump, log)]
        while True:
            codes = {name: p.poll() for name, p in procs.items()}
            failed = [n for n, c in codes.items() if c not in (None, 0)]
            if failed:
                name = failed[0]
                time.sleep(0.5)  # let the pump drain the failed party's last words
                raise PeerFailure(f"party {name!r} failed (exit {codes[name]}): "
                                  f"{_last_line(logs / f'{name}.log')}")  # fmt: skip
            if all(c == 0 for c in codes.values()):
                return
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for pump, log in pumps:
            pump.join(timeout=2)
            log.close()


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("warnings.warn", "compat."))]
    return lines[-1] if lines else "(no output)"


def party_command(job_file: Path, name: str, out: Path, cache: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "mpc_ft.cli", "party", "--job", str(job_file), "--party", name,
            "--out", str(out), "--cache", str(cache), *extra]  # fmt: skip


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """The whole local demo; returns the report (also written to opts.out)."""
    from mpc_ft import backbone, report
    from mpc_ft.dp import report_keys as dp_report_keys

    start = time.perf_counter()
    _check_out(opts.out)
    train_texts, test_texts, dataset_name = prepare_data(opts)
    labels = data_lib.label_names(train_texts)
    job = build_job(opts, labels, len(train_texts))
    backbone_dir = _resolve_backbone(job)
    owners = job.data_owners
    train_shards = data_lib.shard(train_texts, len(owners), opts.seed)
    test_shards = data_lib.shard(test_texts, len(owners), opts.seed)
    cache = opts.cache_dir or opts.out.parent / "cache"

    # Everything is validated: now write, first into a fresh temporary run directory.
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    try:
        (work / "job.toml").write_text(job.to_toml())
        (work / "data").mkdir()
        commands = {}
        for party in job.parties:
            extra = []
            if party in owners:
                i = owners.index(party)
                train_file = work / "data" / f"{party.name}.train.jsonl"
                test_file = work / "data" / f"{party.name}.test.jsonl"
                data_lib.write_jsonl(train_shards[i], train_file)
                data_lib.write_jsonl(test_shards[i], test_file)
                extra = ["--data", str(train_file), "--test-data", str(test_file)]
            if party == job.compute_parties[0] and opts.progress:
                extra.append("--progress")
            if party == job.model_owner:  # the demo's twin starts from the same head
                extra += ["--init-seed", str(job.train.seed)]
            commands[party.name] = party_command(work / "job.toml", party.name, work, cache, extra)
        names = ", ".join(p.name for p in job.parties)
        print(f"mpc-ft demo: {len(train_texts)} training and {len(test_texts)} test examples of "
              f"{dataset_name}, parties {names}", file=sys.stderr)  # fmt: skip
        run_parties(job, commands, work / "logs")
        results = {p.name: _read_json(work / "parties" / f"{p.name}.json") for p in job.parties}

        twin = train_twin(job, train_shards, test_shards, backbone_dir, cache, opts.progress)
        first = results[job.compute_parties[0].name]
        rep = {
            "fingerprint": job.fingerprint(),
            "parties": [{"name": p.name, "roles": list(p.roles)} for p in job.parties],
            "backbone": "all-MiniLM-L6-v2" if job.backbone.path == "default" else backbone_dir,
            "backbone_path": backbone_dir,
            "backbone_identity": backbone.inspect_backbone(backbone_dir).identity,
            "dataset": dataset_name,
            "labels": list(job.labels),
            "train_examples": first["train_examples"],
            "test_examples": first["test_examples"],
            "num_classes": job.num_classes,
            "epochs": job.train.epochs,
            "steps": first["steps"],
            "accuracy_mpc": first["test_accuracy"],
            "accuracy_plaintext": twin["accuracy"],
            "loss_mpc": first["loss"],
            "loss_plaintext": twin["loss"],
            "accuracy_mpc_per_epoch": first["train_accuracy"],
            "accuracy_plaintext_per_epoch": twin["train_accuracy"],
            "seconds_features": max(r.get("seconds_features", 0.0) for r in results.values()),
            "seconds_mpc_train": first["seconds_mpc_train"],
            "seconds_mpc_offline": first.get("seconds_offline", 0.0),
            "seconds_mpc_eval": first["seconds_eval"],
            "seconds_plaintext_train": twin["seconds"],
            "seconds_total": time.perf_counter() - start,
            "bytes_sent_per_party": {
                n: r["bytes_sent"] for n, r in results.items() if "rounds" in r
            },
            "rounds_per_party": {n: r["rounds"] for n, r in results.items() if "rounds" in r},
            "provider": job.mpc.provider,
            "precision_bits": job.precision_bits,
            "head": job.to_dict()["head"],
            "reveals": first["reveals"],
            "mode": job.train.mode,
            **dp_report_keys(first.get("privacy")),
        }
        if job.train.mode == "federated":
            fed = job.federated
            rep |= {"epochs": fed.rounds * fed.local_epochs, "rounds": fed.rounds,
                    "local_epochs": fed.local_epochs}  # fmt: skip
        report.write_report(rep, work)
        report.plot_losses(rep, work)
        if opts.out.exists():
            shutil.rmtree(opts.out)
        work.rename(opts.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(report.summary_table(rep))
    print(f"\nreport: {opts.out / 'report.json'}, plot: {opts.out / 'loss.png'}, "
          f"trained head: {opts.out / 'head'}")  # fmt: skip
    return rep


def _check_out(out: Path) -> None:
    """A finished run replaces --out: refuse anything but an empty or earlier run directory."""
    if out.exists() and not (
        out.is_dir() and (not any(out.iterdir()) or (out / "report.json").is_file())
    ):
        raise BadInput(f"--out {out}: exists and is not an earlier run directory (no report.json)")


def _resolve_backbone(job: JobConfig) -> str:
    from mpc_ft import backbone
    from mpc_ft.party import backbone_path

    path = backbone_path(job)
    info = backbone.inspect_backbone(path)  # BadInput for a directory that is not a model
    backbone.resolve_layer(info, job.backbone.layer)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def train_twin(
    job: JobConfig,
    train_shards: list[data_lib.LabelledTexts],
    test_shards: list[data_lib.LabelledTexts],
    backbone_dir: str,
    cache: Path,
    progress: bool,
) -> dict[str, Any]:
    """The plaintext twin: same features (from the owners' caches), head, init and batch order."""
    from mpc_ft import backbone, train
    from mpc_ft import head as head_def
    from mpc_ft.dp import DpRun
    from mpc_ft.ops import TorchOps

    def features(shards: list[data_lib.LabelledTexts]) -> list[train.Dataset]:
        parts = []
        for shard in shards:
            x, mask = backbone.extract_features(
                shard.texts, backbone=backbone_dir, layer=job.backbone.layer,
                max_tokens=job.backbone.max_tokens, cache_dir=cache, progress=False,
            )  # fmt: skip
            y = data_lib.one_hot(data_lib.encode_labels(shard, job.labels), job.num_classes)
            parts.append(train.Dataset.counted(x, mask, y))
        return parts

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    owners = features(train_shards)
    train_set = train.Dataset.concat(owners)
    test_set = train.Dataset.concat(features(test_shards))
    params = head_def.init_params(job.head, train_set.x.size(2), job.num_classes, job.train.seed)
    start = time.perf_counter()
    if job.train.mode == "federated":  # the same FedAvg rounds with the exact average
        from mpc_ft import federated

        params, history = federated.simulate(params, owners, job)
    else:
        source: Any = train_set
        if job.dp.enabled:  # the owners' Poisson batches in the parties' slots (sampling.py)
            from mpc_ft.dp import spend
            from mpc_ft.sampling import PoissonBatches

            privacy = spend(job.dp, [len(o) for o in owners], job.train)
            source = PoissonBatches.plain(owners, privacy.slots, privacy.sample_rate,
                                          seed=job.train.seed)  # fmt: skip
        params, history = train.train(
            params, source, head=job.head, train_cfg=job.train, ops=TorchOps,
            reveal_scalars=train.plaintext_reveal, progress=False,
            dp=DpRun(job.dp, parties=len(job.compute_parties)),
        )  # fmt: skip
    seconds = time.perf_counter() - start
    accuracy = train.evaluate(
        params, test_set, head=job.head, batch_size=job.train.eval_batch_size, ops=TorchOps,
        reveal_scalars=train.plaintext_reveal,
    )  # fmt: skip
    if progress:
        print(f"plaintext twin: test accuracy {accuracy:.3f}, {seconds:.1f} s", file=sys.stderr)
    return {"accuracy": accuracy, "loss": history.loss, "train_accuracy": history.accuracy,
            "seconds": seconds}  # fmt: skip
