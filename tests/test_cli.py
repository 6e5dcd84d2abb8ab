"""The `mpc-ft` command on bad input: exit 2, one line on stderr naming the culprit, nothing left.

Every case here must fail before any party process starts, so each call takes a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpc_ft import data as md

CLI = [sys.executable, "-m", "mpc_ft.cli"]


def _csv(rows: list[tuple[str, str]], header: str = "text,label") -> bytes:
    return "\n".join([header, *(f"{text},{label}" for text, label in rows)]).encode() + b"\n"


GOOD_ROWS = [(f"review number {i} of the film", ("pos", "neg", "meh")[i % 3]) for i in range(21)]
GOOD = _csv(GOOD_ROWS)
GOOD_JSONL = b"".join(json.dumps({"text": t, "label": lb}).encode() + b"\n" for t, lb in GOOD_ROWS)

# id: (files to create, relative to the test's folder (None: an empty folder), demo arguments,
#      what the one-line message must name)
BAD_DEMO_INPUTS = {
    "missing file": ({}, ["--dataset", "absent.csv"], "absent.csv"),
    "empty file": ({"train.csv": b""}, ["--dataset", "train.csv"], "train.csv"),
    "header only": ({"train.csv": b"text,label\n"}, ["--dataset", "train.csv"], "train.csv"),
    "no text column": (
        {"train.csv": _csv(GOOD_ROWS, header="review,label")},
        ["--dataset", "train.csv"],
        "train.csv",
    ),
    "no label column": (
        {"train.csv": _csv(GOOD_ROWS, header="text,stars")},
        ["--dataset", "train.csv"],
        "train.csv",
    ),
    "only one class": (
        {"train.csv": _csv([(t, "pos") for t, _ in GOOD_ROWS])},
        ["--dataset", "train.csv"],
        "train.csv",
    ),
    "undecodable bytes": (
        {"train.csv": b"text,label\n\xff\xfe bad,1\n"},
        ["--dataset", "train.csv"],
        "train.csv",
    ),
    "broken JSONL line": (
        {"train.jsonl": GOOD_JSONL + b'{"text": "cut off", "label\n'},
        ["--dataset", "train.jsonl"],
        "train.jsonl",
    ),
    "empty text": (
        {"train.csv": GOOD + b"   ,pos\n"},
        ["--dataset", "train.csv"],
        "train.csv",
    ),
    "backbone: empty folder": (
        {"train.csv": GOOD, "model": None},
        ["--dataset", "train.csv", "--backbone", "model"],
        "model",
    ),
    "backbone: junk config.json": (
        {"train.csv": GOOD, "model/config.json": b"{this is not json", "model/w.bin": b"x"},
        ["--dataset", "train.csv", "--backbone", "model"],
        "config.json",
    ),
    "--data-owners 0": (
        {"train.csv": GOOD},
        ["--dataset", "train.csv", "--data-owners", "0"],
        "--data-owners",
    ),
    "--data-owners 99": (
        {"train.csv": GOOD},
        ["--dataset", "train.csv", "--data-owners", "99"],
        "--data-owners",
    ),
    "--data-owners not a number": (
        {"train.csv": GOOD},
        ["--dataset", "train.csv", "--data-owners", "two"],
        "--data-owners",
    ),
    "unknown flag": ({"train.csv": GOOD}, ["--dataset", "train.csv", "--bogus"], "--bogus"),
    "test label unknown to training": (
        {"train.csv": GOOD, "test.csv": _csv(GOOD_ROWS[:5] + [("a new kind", "angry")])},
        ["--dataset", "train.csv", "--test-dataset", "test.csv"],
        "test.csv",
    ),
    "test file broken": (
        {"train.csv": GOOD, "test.csv": _csv(GOOD_ROWS, header="text,stars")},
        ["--dataset", "train.csv", "--test-dataset", "test.csv"],
        "test.csv",
    ),
    "--test-dataset without --dataset": (
        {"test.csv": GOOD},
        ["--test-dataset", "test.csv"],
        "--test-dataset",
    ),
    "--out is a file": (
        {"train.csv": GOOD, "notes.txt": b"keep me"},
        ["--dataset", "train.csv", "--out", "notes.txt"],
        "--out",
    ),
    "--out is a folder that is not a run": (
        {"train.csv": GOOD, "thesis/chapter1.tex": b"keep me"},
        ["--dataset", "train.csv", "--out", "thesis"],
        "--out",
    ),
}


def _make(folder: Path, files: dict[str, bytes | None]) -> None:
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def _mpc_ft(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], culprit: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mpc-ft: error: "), lines[0]
    assert len(lines[0]) > len("mpc-ft: error: ")
    assert culprit in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    "files, args, culprit", BAD_DEMO_INPUTS.values(), ids=BAD_DEMO_INPUTS.keys()
)
def test_demo_rejects_bad_input_in_one_line_and_leaves_nothing(
    tmp_path: Path, files: dict[str, bytes | None], args: list[str], culprit: str
) -> None:
    _make(tmp_path, files)
    before = _snapshot(tmp_path)
    demo = ["demo", "--out", "run", "--cache", "cache", "--no-progress"]
    result = _mpc_ft([*demo, *args], cwd=tmp_path)
    _assert_one_line_error(result, culprit)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists()
    assert _snapshot(tmp_path) == before  # nothing new, nothing changed, nothing removed


def test_party_with_a_missing_job_file(tmp_path: Path) -> None:
    result = _mpc_ft(["party", "--job", "missing.toml", "--party", "x"], cwd=tmp_path)
    _assert_one_line_error(result, "missing.toml")
    assert list(tmp_path.iterdir()) == []


def test_party_with_an_unknown_name_lists_the_parties(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        'name = "j"\nlabels = ["a", "b"]\n'
        '[[party]]\nname = "alice"\nroles = ["data_owner"]\n'
        '[[party]]\nname = "bob"\nroles = ["data_owner", "model_owner"]\n'
        '[[party]]\nname = "dealer"\nroles = ["dealer"]\n',
        encoding="utf-8",
    )
    before = _snapshot(tmp_path)
    result = _mpc_ft(["party", "--job", "job.toml", "--party", "nobody"], cwd=tmp_path)
    line = _assert_one_line_error(result, "'nobody'")
    assert "alice, bob, dealer" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_very_long_text_is_not_rejected(tmp_path: Path, suffix: str) -> None:
    long = " ".join(f"word{i}" for i in range(10_000))
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        path.write_bytes(GOOD + f'"{long}",pos\n'.encode())
    else:
        path.write_bytes(GOOD_JSONL + json.dumps({"text": long, "label": "pos"}).encode() + b"\n")
    data = md.read_labelled_file(path, min_classes=2)
    assert len(data) == len(GOOD_ROWS) + 1
    assert data.texts[-1] == long
    assert data.labels[-1] == "pos"
