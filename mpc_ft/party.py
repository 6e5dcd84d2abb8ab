"""A party's life in one job: `run(job, party, ...)`, the same code for local demos and hosts.

    mpc-ft party --job job.toml --party alice --data alice.csv [--test-data alice_test.csv]

Steps for a computing party:
1. Data owners read their own files and run the public backbone locally (features are cached).
2. Join the job's rendezvous with the rank the job file gives this name, with a timeout.
3. Handshake (sharing.handshake): fingerprints, then public shapes.
4. Share data (each owner) and the initial head (the model owner).
5. Train on shares; reveal per-epoch aggregates; evaluate (only the accuracy is revealed).
6. Reveal the trained head to the model owner alone, who saves it as a plain torch module.
The dealer only serves Beaver triples (compat.run_dealer). Each party writes
`<out>/parties/<name>.json` with what it learned and its communication statistics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpc_ft import compat
from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput, PeerFailure
from mpc_ft.train import Dataset


@dataclass(frozen=True)
class PartyFiles:
    """What only this party has: its data files and where it writes."""

    out_dir: Path
    data: Path | None = None
    test_data: Path | None = None
    cache_dir: Path | None = None
    progress: bool = False


def backbone_path(job: JobConfig) -> str:
    from mpc_ft.backbone import default_backbone_path

    return default_backbone_path() if job.backbone.path == "default" else job.backbone.path


def load_owner_data(job: JobConfig, path: Path, files: PartyFiles) -> Dataset:
    """Read a labelled file and compute its features locally (plaintext, public backbone)."""
    from mpc_ft import backbone, data

    texts = data.read_labelled_file(path)
    labels = data.one_hot(data.encode_labels(texts, job.labels), job.num_classes)
    hidden, mask = backbone.extract_features(
        texts.texts,
        backbone=backbone_path(job),
        layer=job.backbone.layer,
        max_tokens=job.backbone.max_tokens,
        cache_dir=files.cache_dir,
        progress=files.progress,
    )
    return Dataset(x=hidden, mask=mask, y=labels)


def endpoint(job: JobConfig, name: str) -> compat.PartyEndpoint:
    return compat.PartyEndpoint(
        rank=job.rank(name),
        world_size=len(job.compute_parties),
        rendezvous=job.mpc.rendezvous,
        provider=job.mpc.provider,
        precision_bits=job.precision_bits,
        timeout_s=job.mpc.timeout_s,
        socket_ifname=job.mpc.socket_ifname or None,
    )


def run(job: JobConfig, name: str, files: PartyFiles) -> dict[str, Any]:
    """Run party `name` of `job` to the end; returns (and writes) its result record."""
    party = job.party(name)
    torch.manual_seed(0)  # CrypTen's own randomness uses its generators, not this one
    result: dict[str, Any] = {"party": name, "roles": list(party.roles), "fingerprint": None}
    start = time.perf_counter()
    try:
        if "dealer" in party.roles:
            compat.run_dealer(endpoint(job, name))
        else:
            result |= _compute(job, name, files)
    except RuntimeError as e:  # gloo: connection reset, timeout
        raise PeerFailure(f"party {name!r}: a peer failed or timed out ({_one_line(e)})") from e
    result["fingerprint"] = job.fingerprint()
    result["seconds_total"] = time.perf_counter() - start
    out = files.out_dir / "parties"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / f"{name}.json")
    return result


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _compute(job: JobConfig, name: str, files: PartyFiles) -> dict[str, Any]:
    from mpc_ft import head as head_def
    from mpc_ft import sharing, train
    from mpc_ft.ops import MpcOps

    party = job.party(name)
    is_owner = "data_owner" in party.roles
    if is_owner and files.data is None:
        raise BadInput(f"party {name!r} is a data owner: give its dataset with --data FILE")
    if not is_owner and (files.data or files.test_data):
        raise BadInput(f"party {name!r} is not a data owner in this job; it takes no --data")

    t0 = time.perf_counter()
    local = None
    if is_owner:
        local = {"train": load_owner_data(job, files.data, files)}
        if files.test_data:
            local["test"] = load_owner_data(job, files.test_data, files)
    seconds_features = time.perf_counter() - t0
    train_set = local["train"] if local else None
    test_set = local.get("test") if local else None
    shapes = sharing.PartyShapes(
        train=len(train_set) if train_set else 0,
        test=len(test_set) if test_set else 0,
        tokens=train_set.x.size(1) if train_set else job.backbone.max_tokens,
        width=train_set.x.size(2) if train_set else 0,
    )

    crypten = compat.init_party(endpoint(job, name))
    try:
        comm = compat.communicator()
        rank = job.rank(name)
        everyone = sharing.handshake(job, name, shapes, comm)
        width = next(s.width for s in everyone if s.train > 0)
        t1 = time.perf_counter()
        shared = sharing.share_datasets(crypten, job, local, everyone, rank)
        shapes_of_head = head_def.param_shapes(job.head, width, job.num_classes)
        initial = None
        if "model_owner" in party.roles:
            initial = head_def.init_params(job.head, width, job.num_classes, job.train.seed)
        model_owner_rank = job.rank(job.model_owner.name)
        params = sharing.share_head(crypten, initial, shapes_of_head, model_owner_rank)
        seconds_sharing = time.perf_counter() - t1

        revealer = sharing.Revealer(job, rank)
        ops = MpcOps(crypten)
        compat.reset_communication_stats()
        t2 = time.perf_counter()
        params, history = train.train(
            params,
            shared["train"],
            head=job.head,
            train_cfg=job.train,
            ops=ops,
            reveal_scalars=revealer.scalars,
            progress=files.progress,
        )
        seconds_train = time.perf_counter() - t2
        stats = compat.communication_stats()
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
    finally:
        compat.shutdown()
    return {
        "train_examples": sum(s.train for s in everyone),
        "test_examples": sum(s.test for s in everyone),
        "loss": history.loss,
        "train_accuracy": history.accuracy,
        "seconds_per_epoch": history.seconds,
        "steps": history.steps,
        "test_accuracy": accuracy,
        "seconds_features": seconds_features,
        "seconds_sharing": seconds_sharing,
        "seconds_mpc_train": seconds_train,
        "seconds_eval": seconds_eval,
        "bytes_sent": stats["bytes"],
        "rounds": stats["rounds"],
        "reveals": revealer.log,
    }
