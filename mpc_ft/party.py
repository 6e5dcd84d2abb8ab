"""A party's life in one job: `run(job, party, files)`, the same code for local demos and hosts.

    mpc-ft party --job parties/three_hosts.toml --party alice --private alice.private.toml

Steps for every process (computing party or dealer):
1. Data owners read their own files and run the public backbone locally (features are cached).
2. Join the control plane at the job's rendezvous (control.py): the first computing party
   hosts it; the others wait for it up to mpc.timeout_s.
3. Handshake (handshake.py): job token (HMAC over fresh nonces), job fingerprint, versions,
   backbone identity and feature shapes. Any mismatch: every process exits 2.
4. Start the heartbeat watch; build CrypTen's gloo process group on the same store.
5. Share data (each owner; under DP only the test set: each step's training batch is shared
   as it is drawn, sampling.py) and the initial head (the model owner) (sharing.py).
6. Train on shares, each step's Beaver triples fetched in one request before it (offline.py;
   every train.checkpoint_every steps, save this party's shares; with
   --resume, continue from the newest step every party holds: checkpoint.py); reveal
   per-epoch aggregates; evaluate (only the accuracy is revealed).
7. Reveal the trained head to the model owner alone, who saves it as a plain torch module.
The dealer only serves Beaver triples (compat.run_dealer) and leaves when the job ends or fails.
Each process writes `<out>/parties/<name>.json` (what it learned, its communication) and
`<out>/parties/<name>.log`. A lost peer ends every other process with exit code 3 (control.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpc_ft import compat, handshake, network
from mpc_ft.config import JobConfig
from mpc_ft.control import ControlPlane
from mpc_ft.errors import BadInput
from mpc_ft.train import Dataset

log = logging.getLogger("mpc_ft")


@dataclass(frozen=True)
class PartyFiles:
    """What only this party has: its files, its job token, its network interface."""

    out_dir: Path
    data: Path | None = None
    test_data: Path | None = None
    cache_dir: Path | None = None
    progress: bool = False
    token: bytes = field(default=b"", repr=False)
    backbone: str | None = None  # this host's copy of the job's backbone (checked by identity)
    interface: str | None = None  # the interface gloo binds (default: the one with our host)
    resume: bool = False  # continue from the newest checkpoint that every party holds
    init_seed: int = -1  # the model owner's private seed for the initial head; -1: fresh, secret
    infer_client: str | None = None  # private inference for this party (infer.py), not training


def setup_logging(out_dir: Path, name: str) -> Path:
    """This party's log: `<out>/parties/<name>.log`, and the same lines on stderr."""
    path = out_dir / "parties" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    to_stderr = logging.StreamHandler()
    to_stderr.setFormatter(logging.Formatter(f"mpc-ft[{name}] %(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [to_file, to_stderr]
    log.setLevel(logging.INFO)
    log.propagate = False
    return path


def backbone_path(job: JobConfig, local_copy: str | None = None) -> str:
    from mpc_ft.backbone import default_backbone_path

    if local_copy:
        return local_copy
    return default_backbone_path() if job.backbone.path == "default" else job.backbone.path


def load_owner_data(job: JobConfig, path: Path, files: PartyFiles) -> Dataset:
    """Read a labelled file and compute its features locally (plaintext, public backbone)."""
    from mpc_ft import data

    texts = data.read_labelled_file(path)
    labels = data.one_hot(data.encode_labels(texts, job.labels), job.num_classes)
    return Dataset.counted(*features(job, files, texts.texts), labels)


def features(job: JobConfig, files: PartyFiles, texts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and padding masks of `texts` from this host's copy of the backbone."""
    from mpc_ft import backbone

    return backbone.extract_features(
        texts,
        backbone=backbone_path(job, files.backbone),
        layer=job.backbone.layer,
        max_tokens=job.backbone.max_tokens,
        cache_dir=files.cache_dir,
        progress=files.progress,
    )


def endpoint(job: JobConfig, name: str, interface: str | None,
             address: str) -> compat.PartyEndpoint:  # fmt: skip
    return compat.PartyEndpoint(
        rank=job.rank(name),
        world_size=len(job.compute_parties),
        rendezvous=job.mpc.rendezvous,
        provider=job.mpc.provider,
        precision_bits=job.precision_bits,
        timeout_s=job.mpc.timeout_s,
        socket_ifname=interface,
        address=address,
    )


def check_launcher_environment(job: JobConfig, name: str, environ: dict[str, str]) -> None:
    """Under torchrun (env://), its RANK and WORLD_SIZE must be what the job file says."""
    if job.mpc.rendezvous != "env://":
        return
    expected = {"RANK": job.rank(name), "WORLD_SIZE": len(job.parties)}
    for key, value in expected.items():
        if key in environ and environ[key] != str(value):
            raise BadInput(
                f"the launcher set {key}={environ[key]} but the job file gives party "
                f"{name!r} {key}={value} (torchrun: --node-rank "
                f"{job.rank(name)} --nnodes {len(job.parties)}; see `mpc-ft rank`)"
            )


def run(job: JobConfig, name: str, files: PartyFiles) -> dict[str, Any]:
    """Run party `name` of `job` to the end; returns (and writes) its result record."""
    party = job.party(name)
    start = time.perf_counter()
    rendezvous = network.parse_rendezvous(job.mpc.rendezvous)
    check_launcher_environment(job, name, dict(os.environ))
    interface, address = network.choose_interface(party.host, files.interface)
    if not files.token:
        raise BadInput(f"party {name!r}: no job token")
    _checkpoints(job, name, files)  # a foreign or torn checkpoint: exit 2 before any work
    local = load_local_data(job, name, files)
    seconds_features = time.perf_counter() - start
    setup_logging(files.out_dir, name)  # everything local checked out: from here on, a log
    warning = network.plaintext_link_warning(name, address, job.mpc.secure_tunnel)
    if warning:
        log.warning(warning)

    ctl = ControlPlane(job, name, rendezvous)
    ctl.connect()
    try:
        hellos = handshake.exchange(ctl, job, my_hello(job, name, local, files), files.token,
                                    owners=_owners(job, files))  # fmt: skip
        log.info("handshake done with %s", ", ".join(h.name for h in hellos.values()))
        ctl.start_watch()
        ep = endpoint(job, name, interface, address)
        try:
            if "dealer" in party.roles:
                compat.run_dealer(ep, ctl.store)
                if not ctl.finished(job.compute_parties[0].name):  # TTPServer hides errors
                    ctl.diagnose(RuntimeError("the dealer's link to the parties broke"))
                ctl.finish()
                result: dict[str, Any] = {"reveals": []}  # the dealer opens nothing
            else:
                everyone = [hellos[job.rank(p.name)] for p in job.compute_parties]
                result = _compute(job, name, files, local, everyone, ctl, ep)
                result["seconds_features"] = seconds_features
        except RuntimeError as e:  # gloo: connection reset, timeout
            ctl.diagnose(e)
        ctl.close()
    except KeyboardInterrupt:
        ctl.die(f"party {name!r} was interrupted", blame=[name], code=130)
    result |= {"party": name, "roles": list(party.roles), "fingerprint": job.fingerprint(),
               "seconds_total": time.perf_counter() - start}  # fmt: skip
    out = files.out_dir / "parties"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}.infer" if files.infer_client else name
    tmp = out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / f"{stem}.json")
    if "loss" in result:
        accuracy = result["test_accuracy"]
        log.info("finished: loss per epoch %s, test accuracy %s; sent %.1f MiB in %d rounds",
                 ", ".join(f"{x:.4f}" for x in result["loss"]),
                 "-" if accuracy is None else f"{accuracy:.3f}",
                 result["bytes_sent"] / 2**20, result["rounds"])  # fmt: skip
    if (files.out_dir / "head").is_dir() and "model_owner" in party.roles:
        log.info("the trained head (plain torch, HeadModule.load): %s", files.out_dir / "head")
    log.info("done: %s", out / f"{stem}.json")
    return result


def _checkpoints(job: JobConfig, name: str, files: PartyFiles) -> tuple[int, ...]:
    """The checkpoint steps this computing party holds (BadInput for a foreign file)."""
    if "dealer" in job.party(name).roles or files.infer_client:
        return ()
    from mpc_ft import checkpoint

    return tuple(checkpoint.steps(job, files.out_dir, name))


def _owners(job: JobConfig, files: PartyFiles) -> set[str] | None:
    """The parties whose hellos carry data: the data owners, or the inference client."""
    return {files.infer_client} if files.infer_client else None


def load_local_data(job: JobConfig, name: str, files: PartyFiles) -> dict[str, Any] | None:
    """A data owner's own train (and test) features, or the inference client's texts and
    features; None for the other parties."""
    if files.infer_client:
        from mpc_ft import infer

        client = job.party(files.infer_client)
        if "dealer" in client.roles:
            raise BadInput(f"--client {client.name!r} is the dealer; name a computing party")
        if name != client.name and (files.data or files.test_data):
            raise BadInput(f"party {name!r} is not the inference client; it takes no --data")
        if name != client.name:
            return None
        return infer.load_client_texts(job, files.data, lambda t: features(job, files, t))
    is_owner = "data_owner" in job.party(name).roles
    if is_owner and files.data is None:
        raise BadInput(f"party {name!r} is a data owner: give its dataset with --data FILE")
    if not is_owner and (files.data or files.test_data):
        raise BadInput(f"party {name!r} is not a data owner in this job; it takes no --data")
    if not is_owner:
        return None
    from mpc_ft.backbone import check_declared

    check_declared(job, backbone_path(job, files.backbone))
    local = {"train": load_owner_data(job, files.data, files)}
    if files.test_data:
        local["test"] = load_owner_data(job, files.test_data, files)
    return local


def my_hello(
    job: JobConfig, name: str, local: dict[str, Dataset] | None, files: PartyFiles
) -> handshake.Hello:
    shape = {}
    if local:
        from mpc_ft.backbone import inspect_backbone

        train = local["train"] if "train" in local else local["features"]
        shape = dict(
            backbone=inspect_backbone(backbone_path(job, files.backbone)).identity,
            tokens=train.x.size(1), width=train.x.size(2), train=len(train),
            test=len(local["test"]) if "test" in local else 0,
        )  # fmt: skip
    return handshake.Hello(name=name, fingerprint=job.fingerprint(), nonce=os.urandom(32).hex(),
                           resume=files.resume, checkpoints=_checkpoints(job, name, files),
                           client=files.infer_client or "",
                           **handshake.local_versions(), **shape)  # fmt: skip


def _compute(
    job: JobConfig,
    name: str,
    files: PartyFiles,
    local: dict[str, Dataset] | None,
    everyone: list[handshake.Hello],
    ctl: ControlPlane,
    ep: compat.PartyEndpoint,
) -> dict[str, Any]:
    from mpc_ft import checkpoint, sharing, train
    from mpc_ft import head as head_def
    from mpc_ft.dp import DpRun
    from mpc_ft.ops import MpcOps

    party = job.party(name)
    rank = job.rank(name)
    crypten = compat.init_party(ep, ctl.store)
    if files.infer_client:
        from mpc_ft import infer

        texts = next(h.train for h in everyone if h.name == files.infer_client)
        policy = [{"what": "predicted labels", "to": files.infer_client,
                   "count": texts * job.num_classes}]  # fmt: skip
        revealer = sharing.Revealer(job, rank, policy)
        result = infer.run_inference(crypten, job, name, files.infer_client, files.out_dir, local,
                                     {h.name: h for h in everyone}, revealer)  # fmt: skip
        ctl.finish()
        compat.shutdown()
        return result | {"reveals": revealer.log}
    width = next(s.width for s in everyone if s.train > 0)
    if job.train.mode == "federated":  # FedAvg with secure aggregation: mpc_ft/federated.py
        from mpc_ft import federated

        result = federated.party_result(crypten, job, name, local, everyone, width,
                                        files.out_dir, files.progress)  # fmt: skip
        ctl.finish()  # before shutdown, as below
        compat.shutdown()
        return result
    t1 = time.perf_counter()
    train_data: Any = None
    if job.dp.enabled:  # DP: each step's batch is a fresh private Poisson sample (sampling.py)
        from mpc_ft.dp import spend

        privacy = spend(job.dp, [s.train for s in everyone if s.train > 0], job.train)
        shared = sharing.share_datasets(crypten, job, local, everyone, rank, parts=("test",))
        train_data = sharing.poisson_batches(crypten, job, local, everyone, rank,
                                             privacy.slots, privacy.sample_rate)  # fmt: skip
    else:
        shared = sharing.share_datasets(crypten, job, local, everyone, rank)
        train_data = shared["train"]
    shapes_of_head = head_def.param_shapes(job.head, width, job.num_classes)
    initial = None
    if "model_owner" in party.roles:
        import secrets

        seed = files.init_seed if files.init_seed >= 0 else secrets.randbits(62)
        initial = head_def.init_params(job.head, width, job.num_classes, seed)
    model_owner_rank = job.rank(job.model_owner.name)
    params = sharing.share_head(crypten, initial, shapes_of_head, model_owner_rank)
    seconds_sharing = time.perf_counter() - t1

    policy = sharing.declared_reveals(job, has_test=shared["test"] is not None)
    ops = MpcOps(crypten, triples_ahead=job.mpc.triples_ahead,
                 reuse_openings=job.mpc.reuse_openings)  # fmt: skip
    resume = None
    step = handshake.resume_step(everyone, {p.name for p in job.compute_parties})
    if step:
        resume = checkpoint.load(job, files.out_dir, name, step, crypten, ops)
        log.info("resuming from checkpoint step %d (held by every party)", step)
        policy = policy[len(resume.history.loss) :]  # those epochs were revealed before the crash
    revealer = sharing.Revealer(job, rank, policy)

    def save(state: train.TrainState) -> None:
        every = job.train.checkpoint_every
        if every and state.step % every == 0:
            path = checkpoint.save(job, files.out_dir, name, state)
            log.info("checkpoint step %d: %s", state.step, path)

    compat.reset_communication_stats()
    log.info("training on %d examples for %d epoch(s)", len(train_data), job.train.epochs)
    t2 = time.perf_counter()
    params, history = train.train(
        params,
        train_data,
        head=job.head,
        train_cfg=job.train,
        ops=ops,
        reveal_scalars=revealer.scalars,
        progress=files.progress,
        on_step=save,
        resume=resume,
        dp=DpRun(job.dp, parties=len(job.compute_parties)),
    )
    seconds_train = time.perf_counter() - t2
    stats = compat.communication_stats()
    trained_on = next(s.backbone for s in everyone if s.train > 0)
    checkpoint.save_head(job, files.out_dir, name, params, trained_on)  # for private inference
    accuracy = None
    t3 = time.perf_counter()
    if shared["test"] is not None:
        accuracy = train.evaluate(
            params,
            shared["test"],
            head=job.head,
            batch_size=job.train.eval_batch_size,
            ops=ops,
            reveal_scalars=revealer.scalars,
            progress=files.progress,
        )
    seconds_eval = time.perf_counter() - t3
    if job.reveal.head == "model_owner":
        trained = revealer.head(params, job.model_owner.name)
        if trained is not None:
            from mpc_ft.head import HeadModule

            HeadModule(job.head, trained, list(job.labels)).save(files.out_dir / "head")
    ctl.finish()  # before shutdown: the first party's shutdown tells the dealer to stop
    compat.shutdown()
    return {
        "train_examples": sum(s.train for s in everyone),
        "test_examples": sum(s.test for s in everyone),
        "loss": history.loss,
        "train_accuracy": history.accuracy,
        "seconds_per_epoch": history.seconds,
        "steps": history.steps,
        "test_accuracy": accuracy,
        "seconds_sharing": seconds_sharing,
        "seconds_mpc_train": seconds_train,  # includes the offline phase below
        "seconds_offline": ops.triples.seconds if ops.triples else 0.0,
        "seconds_eval": seconds_eval,
        "bytes_sent": stats["bytes"],
        "rounds": stats["rounds"],
        "reveals": revealer.log,
        "privacy": history.privacy,
    }
