"""`mpc-ft demo` end to end at a tiny size: real processes, real CrypTen, the dealer, a report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpc_ft.head import HeadModule
from mpc_ft.report import validate_report
from tests.test_backbone import WORDS, _save_llama

pytestmark = pytest.mark.slow


def _demo(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpc_ft.cli", "demo", "--out", str(out), "--cache",
           str(tmp_path / "cache"), "--epochs", "1", "--no-progress", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert (out / "loss.png").stat().st_size > 1000
    assert "MPC - plaintext accuracy" in proc.stdout
    return report


def test_default_demo_tiny(tmp_path):
    report = _demo(tmp_path, "--train-size", "40", "--test-size", "20")
    assert report["dataset"] == "rotten_tomatoes"
    assert report["head"]["attention"] == "quad"  # the demo's default: the MPC-native head
    assert [p["name"] for p in report["parties"]] == ["alice", "bob", "dealer"]
    assert (report["train_examples"], report["test_examples"], report["steps"]) == (40, 20, 2)
    assert abs(report["loss_mpc"][0] - report["loss_plaintext"][0]) < 0.02
    assert report["provider"] == "TTP"
    assert set(report["bytes_sent_per_party"]) == {"alice", "bob"}
    assert report["reveals"] == [
        {"what": "watchdog step 2", "to": "all", "count": 1},  # the overflow check's one number
        {"what": "epoch 1", "to": "all", "count": 2},
        {"what": "test accuracy", "to": "all", "count": 1},
        {"what": "trained head", "to": "bob", "count": 16},  # parameters of the 1-block head
    ]


def test_own_csv_with_three_classes_a_decoder_backbone_and_the_exact_head(tmp_path):
    backbone = _save_llama(tmp_path / "llama", {"unk_token": "<unk>", "eos_token": "</s>"})
    rows = [(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 5)), f"c{i % 3}")
            for i in range(36)]  # fmt: skip
    for name, part in (("train.csv", rows[:24]), ("test.csv", rows[24:])):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *part])
    report = _demo(tmp_path, "--dataset", str(tmp_path / "train.csv"), "--test-dataset",
                   str(tmp_path / "test.csv"), "--backbone", str(backbone), "--data-owners", "3",
                   "--max-tokens", "8", "--head", "exact")  # fmt: skip
    assert report["num_classes"] == 3 and report["labels"] == ["c0", "c1", "c2"]
    assert [p["name"] for p in report["parties"]][:3] == ["alice", "bob", "carol"]
    assert report["head"]["attention"] == "softmax" and report["head"]["norm"] == "layernorm"
    assert abs(report["loss_mpc"][0] - report["loss_plaintext"][0]) < 0.02
    head = HeadModule.load(tmp_path / "run" / "head")  # plain torch, no CrypTen involved
    assert head.head.activation == "gelu"
    logits = head(torch.randn(5, 8, 32), torch.ones(5, 8))
    assert logits.shape == (5, 3) and head.labels == ["c0", "c1", "c2"]
