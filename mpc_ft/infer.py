"""Private inference with the trained head kept secret-shared: only the client learns its labels.

    mpc-ft infer --job JOB.toml --party NAME --client alice [--data texts.txt] --out DIR
    (every computing party and the dealer, each with the --out of its training run; only the
    client gives --data: a .txt file with one text per line, or a labelled CSV/JSONL file)

Steps (party.run does the control plane, the handshake and the dealer, as for training):
1. The client runs the public backbone on its texts locally (plaintext, cached) and announces
   only their number in its hello; the handshake checks that every party names the same client.
2. Every computing party loads its own shares of the trained head (checkpoint.save_head wrote
   them after training); the client's backbone must be the one the head was trained on.
3. The client secret-shares its features, padding masks and inverse token counts.
4. All parties run the encrypted forward pass in batches and take a one-hot argmax, on shares.
5. The one-hot predictions are revealed to the client alone (sharing.Revealer.to_party); it
   writes `<out>/predictions.csv` (text, label) and, if its file had labels, scores them
   locally. The other parties learn the number of texts and nothing else.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput
from mpc_ft.train import Dataset

log = logging.getLogger("mpc_ft")


def load_client_texts(job: JobConfig, path: Path | None, features: Any) -> dict[str, Any]:
    """The client's texts and their features (computed by `features(texts)`)."""
    from mpc_ft import data

    if path is None:
        raise BadInput("the inference client gives its texts with --data FILE")
    texts = data.read_texts(path)
    hidden, mask = features(texts.texts)
    return {"texts": texts, "features": Dataset.counted(hidden, mask, None)}


def run_inference(
    crypten: Any,
    job: JobConfig,
    name: str,
    client: str,
    out_dir: Path,
    local: dict[str, Any] | None,
    hellos: dict[str, Any],
    revealer: Any,
) -> dict[str, Any]:
    """Steps 2-5 for one computing party; returns what it learned (the client: its labels)."""
    from mpc_ft import checkpoint
    from mpc_ft import head as head_def
    from mpc_ft.ops import MpcOps
    from mpc_ft.sharing import share

    params, trained_on = checkpoint.load_head(job, out_dir, name, crypten)
    if hellos[client].backbone != trained_on:
        raise BadInput(f"client {client!r} runs backbone {hellos[client].backbone[:12]}, the "
                       f"head was trained on {trained_on[:12]}")  # fmt: skip
    n, tokens, width = hellos[client].train, job.backbone.max_tokens, hellos[client].width
    src = job.rank(client)
    mine = local["features"] if local else None
    x = share(crypten, mine.x if mine else None, (n, tokens, width), src)
    mask = share(crypten, mine.mask if mine else None, (n, tokens), src)
    inv_count = share(crypten, mine.inv_count if mine else None, (n, 1), src)
    ops = MpcOps(crypten)
    predicted = []
    with crypten.no_grad():
        for index in torch.arange(n).split(job.train.eval_batch_size):
            rows = [ops.rows(t, index) for t in (x, mask, inv_count)]
            logits = head_def.forward(params, rows[0], rows[1], job.head, ops, rows[2])
            predicted.append(logits.argmax(dim=-1, one_hot=True))
    onehot = revealer.to_party(crypten.cat(predicted), client, "predicted labels")
    result: dict[str, Any] = {"client": client, "texts": n}
    if onehot is not None:
        labels = [job.labels[i] for i in onehot.argmax(-1).tolist()]
        result |= _write_predictions(out_dir / "predictions.csv", local["texts"], labels)
    return result


def _write_predictions(path: Path, texts: Any, labels: list[str]) -> dict[str, Any]:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts.texts, labels, strict=True))
    tmp.replace(path)
    result: dict[str, Any] = {"predictions": str(path)}
    if all(texts.labels):  # the client's own labels: scored here, never shared
        right = sum(a == b for a, b in zip(texts.labels, labels, strict=True))
        result["accuracy"] = right / len(labels)
    log.info("predictions for %d texts: %s%s", len(labels), path,
             f" (accuracy on the file's labels {result['accuracy']:.3f})"
             if "accuracy" in result else "")  # fmt: skip
    return result
