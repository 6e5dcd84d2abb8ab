"""Tests for mpc_ft.report: validation, atomic report.json, summary table, loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mpc_ft.report import (
    REQUIRED_KEYS,
    plot_losses,
    summary_table,
    validate_report,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_report(epochs: int = 3) -> dict[str, Any]:
    losses_mpc = [0.69 - 0.1 * i for i in range(epochs)]
    return {
        "fingerprint": "3f2a9c",
        "parties": [
            {"name": "alice", "roles": ["data", "compute"]},
            {"name": "bob", "roles": ["data", "compute"]},
            {"name": "carol", "roles": ["compute"]},
        ],
        "backbone": "/models/sentence-transformers/all-MiniLM-L6-v2",
        "dataset": "sst2-mini",
        "train_examples": 800,
        "test_examples": 200,
        "num_classes": 2,
        "epochs": epochs,
        "steps": 25 * epochs,
        "accuracy_mpc": 0.852,
        "accuracy_plaintext": 0.848,
        "loss_mpc": losses_mpc,
        "loss_plaintext": [v - 0.005 for v in losses_mpc],
        "seconds_features": 12.5,
        "seconds_mpc_train": 93.25,
        "seconds_plaintext_train": 0.75,
        "seconds_total": 110.0,
        "bytes_sent_per_party": {"alice": 12_345_678, "bob": 12_000_000, "carol": 3 * 2**20},
        "rounds_per_party": {"alice": 4321, "bob": 4321, "carol": 4321},
        "accuracy_mpc_per_epoch": [0.8] * epochs,
        "provider": "crypten",
    }


def leftovers(out_dir: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name not in keep)


def test_valid_report_round_trips(tmp_path: Path) -> None:
    report = make_report()
    validate_report(report)
    path = write_report(report, tmp_path / "run")
    assert path == tmp_path / "run" / "report.json"
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == report
    assert leftovers(path.parent, {"report.json"}) == []
    # Overwriting an existing report works and also leaves no temp file.
    write_report(make_report(epochs=2), path.parent)
    assert json.loads(path.read_text())["epochs"] == 2
    assert leftovers(path.parent, {"report.json"}) == []


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_rejected(key: str, tmp_path: Path) -> None:
    report = make_report()
    del report[key]
    with pytest.raises(ValueError, match=key):
        write_report(report, tmp_path)
    assert not (tmp_path / "report.json").exists()
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("accuracy_mpc", 1.5),
        ("accuracy_plaintext", -0.1),
        ("loss_mpc", [0.5, 0.4]),
        ("loss_plaintext", [0.5, 0.4, 0.3, 0.2]),
        ("accuracy_mpc_per_epoch", [0.5]),
        ("epochs", "3"),
        ("train_examples", True),
        ("seconds_total", -1.0),
        ("loss_mpc", [0.5, float("nan"), 0.3]),
        ("bytes_sent_per_party", {"alice": 1.5}),
        ("parties", [{"name": "alice"}]),
        ("dataset", 7),
    ],
)
def test_bad_value_rejected(key: str, value: Any) -> None:
    report = make_report()
    report[key] = value
    with pytest.raises(ValueError, match=key):
        validate_report(report)


def test_summary_table_contents() -> None:
    table = summary_table(make_report())
    assert "85.2%" in table and "84.8%" in table
    for name in ("alice", "bob", "carol"):
        assert name in table
    assert "MPC - plaintext accuracy: +0.4 points" in table
    assert "all-MiniLM-L6-v2" in table and "/models/" not in table
    assert "sst2-mini" in table and "800" in table and "200" in table
    assert "3.00" in table  # carol sent exactly 3 MiB
    lines = table.splitlines()
    header = next(line for line in lines if line.rstrip().endswith("Plaintext"))
    accuracy = next(line for line in lines if line.startswith("Accuracy"))
    assert len(header) == len(accuracy)  # columns are aligned


def test_summary_table_negative_and_zero_gap() -> None:
    report = make_report()
    report["accuracy_mpc"] = 0.8
    assert "MPC - plaintext accuracy: -4.8 points" in summary_table(report)
    report["accuracy_mpc"] = 0.8479
    assert "MPC - plaintext accuracy: +0.0 points" in summary_table(report)


@pytest.mark.parametrize("epochs", [1, 3])
def test_plot_losses_writes_png(epochs: int, tmp_path: Path) -> None:
    path = plot_losses(make_report(epochs), tmp_path)
    assert path == tmp_path / "loss.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024
    assert leftovers(tmp_path, {"loss.png"}) == []
