"""The demo's phases: feature extraction, sharing, MPC training per epoch, evaluation.

    make bench   (or: .venv/bin/pytest benchmarks/test_phases.py)

Runs `mpc-ft demo` (Rotten Tomatoes, all-MiniLM-L6-v2, alice + bob + the dealer, separate OS
processes) at a small size and turns each party's record into rows: one per phase, with the
plaintext twin's training time beside the MPC training time. The feature cache is fresh, so
feature extraction is timed for real.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.measure import pick
from benchmarks.rows import write_row


def test_demo_phases(tmp_path, benchmark):
    train_size, test_size = pick((32, 16), (320, 160))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpc_ft.cli", "demo", "--out", str(out), "--cache",
           str(tmp_path / "cache"), "--train-size", str(train_size), "--test-size",
           str(test_size), "--epochs", "2", "--no-progress"]  # fmt: skip

    def demo():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]

    benchmark.pedantic(demo, rounds=1, iterations=1)
    report = json.loads((out / "report.json").read_text())
    alice = json.loads((out / "parties" / "alice.json").read_text())
    config = {"train_examples": train_size, "test_examples": test_size, "epochs": 2,
              "batch_size": 32, "backbone": report["backbone"]}  # fmt: skip
    twin_epoch = report["seconds_plaintext_train"] / 2
    phases = {
        "features": ([report["seconds_features"]], None),
        "sharing": ([alice["seconds_sharing"]], None),
        "mpc_train_epoch": (alice["seconds_per_epoch"], [twin_epoch, twin_epoch]),
        "evaluation": ([alice["seconds_eval"]], None),
        "total": ([report["seconds_total"]], None),
    }
    for phase, (seconds, plain) in phases.items():
        write_row(f"phases/{phase}", group="phases", config=config, parties=2,
                  seconds=seconds, plaintext_seconds=plain, phase=phase,
                  bytes_per_party=list(report["bytes_sent_per_party"].values())
                  if phase == "total" else None)  # fmt: skip
