"""The reveal log and a leak audit of one tiny real run.

Four `mpc-ft party` processes, each with its own output folder and feature cache as on separate
hosts (alice and bob own data, carol owns the model, a dealer), on a tiny random Llama backbone:
1. every party's reveal log (`<out>/parties/<name>.json`, "reveals") equals the policy
   declared by the job (`sharing.declared_reveals`); the dealer's is empty;
2. no party's view (every file under its output folder and its feature cache, and everything
   it printed) holds another party's secrets: a data owner's texts (a canary word in each), a
   few of its feature values (as float32 bytes and as decimal text), its labels (one-hot bytes,
   the label list, the class list), or the model owner's initial or trained head weights.

What this can prove: that these values, in these encodings, are not written or printed by the
other parties in this run. What it cannot: that nothing can be inferred from what the parties
do see (their shares, the revealed aggregates, the public shapes and batch order), that other
encodings (compressed, rounded, permuted) are absent, or that a party deviating from the
protocol learns nothing. The model owner draws its initial head from its own private seed
(`--init-seed`, here INIT_SEED; by default a fresh secret one), never from the job file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mpc_ft import head as head_def
from mpc_ft.config import load_job
from mpc_ft.sharing import Revealer, UndeclaredReveal, declared_reveals
from tests.test_backbone import WORDS, _save_llama
from tests.test_deploy import PARTIES, TOKEN, _outputs, party_args, run_job, write_job

pytestmark = pytest.mark.slow

OWNERS = ("alice", "bob")
DECRYPTIONS = ("get_plain_text", "reveal", "decrypt")


def _rows(owner: str, n: int) -> list[tuple[str, str]]:
    """Texts with a canary word each (unknown to the tokenizer: it becomes <unk>), and a label
    order that is neither constant nor alternating."""
    seed = sum(map(ord, owner))
    return [(" ".join([*(WORDS[(seed + 3 * j + k) % len(WORDS)] for k in range(2 + j % 4)),
                       f"{owner}canary{j:03d}"]),
             ("fresh", "rotten")[(seed * (j + 1) // 3 + j * j) % 2]) for j in range(n)]  # fmt: skip


INIT_SEED = 4242


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    world = tmp_path_factory.mktemp("audit")
    _save_llama(world / "backbone", {"unk_token": "<unk>", "eos_token": "</s>"})
    for owner in OWNERS:
        rows = _rows(owner, 24)
        for part, chunk in (("train", rows[:16]), ("test", rows[16:])):
            with open(world / f"{owner}.{part}.csv", "w", newline="") as f:
                csv.writer(f).writerows([("text", "label"), *chunk])
    (world / "token").write_text(TOKEN + "\n")
    out = world / "out"
    args = party_args(world, out)
    args["carol"] += ["--init-seed", str(INIT_SEED)]  # private to carol
    exits = run_job(write_job(world / "job.toml", world), args)
    assert {n: e.code for n, e in exits.items()} == dict.fromkeys(PARTIES, 0), _outputs(exits)
    return world, out, exits


def _view(world: Path, out: Path, exits: dict, party: str) -> list[tuple[str, bytes]]:
    """What a party has after the run: its output folder, its feature cache, its output."""
    files = [p for root in (out / party, world / "cache" / party) if root.exists()
             for p in sorted(root.rglob("*")) if p.is_file()]  # fmt: skip
    assert files, party
    view = [(str(p), p.read_bytes()) for p in files] + [("output", exits[party].output.encode())]
    return view + [(f"{where} (whitespace removed)", b"".join(content.split()))
                   for where, content in view]  # fmt: skip


def _float_needles(values: torch.Tensor) -> list[bytes]:
    """Runs of 4 consecutive float32 values as bytes, and single values as decimal text
    (shortest float32 repr, and the float64 repr json.dumps would write)."""
    flat = values.detach().to(torch.float32).contiguous().reshape(-1)
    runs = [i for i in range(0, flat.numel() - 3, 4) if bool((flat[i : i + 4].abs() > 1e-3).all())]
    assert len(runs) >= 2
    needles = [flat[i : i + 4].numpy().tobytes() for i in (runs[0], runs[len(runs) // 2])]
    first = flat[runs[0] : runs[0] + 3].tolist()
    for v in first:
        needles += [str(np.float32(v)).encode(), repr(float(v)).encode()]
    # three in a row at 4 decimals, as torch prints a tensor or "%.4f" a list (the search
    # ignores whitespace, which torch uses to align columns)
    return needles + [",".join(f"{v:.4f}" for v in first).encode()]


def _secrets(world: Path, out: Path) -> dict[str, list[bytes]]:
    """Each party's secrets, as byte strings to look for in the others' views."""
    job = load_job(world / "job.toml")
    secrets: dict[str, list[bytes]] = {}
    for owner in OWNERS:
        rows = _rows(owner, 24)
        needles = [f"{owner}canary".encode(), rows[5][0].encode()]
        caches = sorted((world / "cache" / owner).glob("*.safetensors"))
        assert len(caches) == 2  # train and test features
        for cache in caches:
            features = load_file(cache)["hidden"]
            needles += _float_needles(features[:, 0, :])  # the first token is always real
        for part in (rows[:16], rows[16:]):
            labels = [label for _, label in part]
            index = [job.labels.index(label) for label in labels]
            one_hot = torch.nn.functional.one_hot(torch.tensor(index), 2).float()
            needles += [
                json.dumps(labels).encode(),
                json.dumps(index).encode(),
                ",".join(labels).encode(),
                one_hot.numpy().tobytes(),
                json.dumps(index, separators=(",", ":")).encode(),
                json.dumps(one_hot.long().tolist(), separators=(",", ":")).encode(),
            ]
        secrets[owner] = needles
    initial = head_def.init_params(job.head, 32, job.num_classes, INIT_SEED)
    trained = load_file(out / "carol" / "head" / "head.safetensors")
    secrets["carol"] = [needle for params in (initial, trained) for name, w in params.items()
                        if name.endswith(".w") for needle in _float_needles(w)]  # fmt: skip
    return secrets


def test_every_partys_reveal_log_is_the_declared_policy(audited_run):
    world, out, _ = audited_run
    job = load_job(world / "job.toml")
    policy = declared_reveals(job, has_test=True)
    # the policy as the job file states it: each epoch's aggregates and the test accuracy to
    # all, then every tensor of the saved head to the model owner alone
    saved = load_file(out / job.model_owner.name / "head" / "head.safetensors")
    assert [(r["what"], r["to"]) for r in policy] == [
        *((f"epoch {e + 1}", "all") for e in range(job.train.epochs)),
        ("test accuracy", "all"),
        ("trained head", job.model_owner.name),
    ]
    assert policy[-1]["count"] == len(saved)
    for party in job.parties:
        record = json.loads((out / party.name / "parties" / f"{party.name}.json").read_text())
        expected = [] if party == job.dealer else policy
        data = [r for r in record["reveals"] if not r["what"].startswith("watchdog")]
        assert data == expected, party.name
        # the overflow watchdog (declared by train.watchdog_every): one count per check
        steps, every = record.get("steps", 0), job.train.watchdog_every
        checks = [s for s in range(1, steps + 1) if s % every == 0 or s == steps]
        assert [r for r in record["reveals"] if r not in data] == [
            {"what": f"watchdog step {s}", "to": "all", "count": 1} for s in checks
        ], party.name


def test_no_party_holds_another_partys_texts_features_labels_or_weights(audited_run):
    world, out, exits = audited_run
    secrets = _secrets(world, out)
    views = {party: _view(world, out, exits, party) for party in PARTIES}
    # Controls: the search finds each kind of secret where it legitimately is.
    data = (world / "alice.train.csv").read_bytes()
    assert secrets["alice"][0] in data and secrets["alice"][1] in data
    alice_cache = b"".join(content for path, content in views["alice"] if "cache" in path)
    assert sum(needle in alice_cache for needle in secrets["alice"]) >= 4  # feature bytes
    carol_head = (out / "carol" / "head" / "head.safetensors").read_bytes()
    assert any(needle in carol_head for needle in secrets["carol"])
    leaks = [
        f"{owner}'s secret #{i} ({needle[:40]!r}) in {party}'s {where}"
        for owner, needles in secrets.items()
        for party, view in views.items()
        if party != owner
        for i, needle in enumerate(needles)
        for where, content in view
        if needle in content
    ]
    assert leaks == []


def test_the_revealer_refuses_an_undeclared_reveal_before_decrypting():
    job = load_job(Path(__file__).parent.parent / "parties" / "two_parties.toml")
    opened = []

    def decrypt():
        opened.append(1)
        return "plaintext"

    policy = declared_reveals(job, has_test=False)
    revealer = Revealer(job, 0, policy)
    for entry in policy:
        assert revealer._open(entry["what"], entry["to"], entry["count"], decrypt) == "plaintext"
    assert revealer.log == policy and len(opened) == len(policy)
    for what, to, count in [("trained head", "alice", policy[-1]["count"]),  # to the wrong one
                            ("epoch 9", "all", 2)]:  # fmt: skip
        fresh = Revealer(job, 0, policy)
        with pytest.raises(UndeclaredReveal, match="undeclared reveal"):
            fresh._open(what, to, count, decrypt)
        assert fresh.log == []
    with pytest.raises(UndeclaredReveal, match="nothing more"):  # one more than declared
        revealer._open(*policy[0].values(), decrypt)
    assert len(opened) == len(policy)  # nothing refused was decrypted


def test_the_policy_follows_the_job():
    job = load_job(Path(__file__).parent.parent / "parties" / "two_parties.toml")
    full = declared_reveals(job.replace(train={"epochs": 3}), has_test=True)
    assert [r["what"] for r in full] == ["epoch 1", "epoch 2", "epoch 3", "test accuracy",
                                         "trained head"]  # fmt: skip
    kept_shared = declared_reveals(job.replace(reveal={"head": "nobody"}), has_test=False)
    assert all(r["to"] == "all" for r in kept_shared) and len(kept_shared) == job.train.epochs
    shapes = head_def.param_shapes(job.head, 384, job.num_classes)
    assert full[-1] == {"what": "trained head", "to": job.model_owner.name, "count": len(shapes)}


def test_no_decryption_in_mpc_ft_bypasses_the_revealer():
    """Static guard for the reveal log: calls of CrypTen's ways to decrypt (get_plain_text,
    reveal, decrypt) appear in mpc_ft/ only inside sharing.Revealer. (benchmarks/ and tests/
    decrypt freely: they hold every party's data anyway.)"""
    import ast

    package = Path(__file__).parent.parent / "mpc_ft"
    calls = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        owner = {id(n): c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                 for n in ast.walk(c)}  # fmt: skip
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr in DECRYPTIONS:
                calls.append((path.name, node.lineno, owner.get(id(node))))
    assert calls, "the scan found no decryption at all"
    assert {(name, cls) for name, _, cls in calls} == {("sharing.py", "Revealer")}, calls
