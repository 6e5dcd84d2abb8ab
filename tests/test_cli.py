"""The `mpc-ft` command on bad input: exit 2, one line on stderr naming the culprit, nothing left.

Every case here must fail before any party process starts, so each call takes a few seconds.
"""

from __future__ import annotations

import json
import os
import stat
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


def _mpc_ft(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MPC_FT_TOKEN"} | (env or {})
    return subprocess.run(
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False, env=env
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


JOB = (
    'name = "j"\nlabels = ["pos", "neg", "meh"]\n'
    '[[party]]\nname = "alice"\nroles = ["data_owner"]\n'
    '[[party]]\nname = "bob"\nroles = ["data_owner", "model_owner"]\n'
    '[[party]]\nname = "dealer"\nroles = ["dealer"]\n'
)
TOKEN_ENV = {"MPC_FT_TOKEN": "c4" * 32}
TORCHRUN_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "WORLD_SIZE": "3"}

# id: (files, party arguments, environment, what the one-line message must name)
BAD_PARTY_INPUTS = {
    "no token": ({}, ["--party", "dealer"], {}, "no job token"),
    "short token": ({"t": b"abc\n"}, ["--party", "dealer", "--token-file", "t"], {}, "at least 32"),
    "missing token file": ({}, ["--party", "dealer", "--token-file", "t"], {}, "--token-file t"),
    "missing private file": ({}, ["--party", "dealer", "--private", "p.toml"], TOKEN_ENV, "p.toml"),
    "unknown private key": (
        {"p.toml": b"colour = 1\n"}, ["--party", "dealer", "--private", "p.toml"], TOKEN_ENV,
        "colour",
    ),
    "bad interface": ({}, ["--party", "dealer", "--interface", "nosuch0"], TOKEN_ENV, "nosuch0"),
    "data for the dealer": (
        {"a.csv": GOOD}, ["--party", "dealer", "--data", "a.csv"], TOKEN_ENV, "not a data owner",
    ),
    "owner without data": ({}, ["--party", "alice"], TOKEN_ENV, "--data"),
    "owner's label not in the job": (
        {"a.csv": _csv([("fine film", "pos"), ("odd film", "great")])},
        ["--party", "alice", "--data", "a.csv"], TOKEN_ENV, "great",
    ),
    "env:// without MASTER_ADDR": (
        {"job.toml": JOB.replace('"dealer"]\n', '"dealer"]\n[mpc]\nrendezvous = "env://"\n', 1)
         .encode()},
        ["--party", "dealer"], TOKEN_ENV, "MASTER_ADDR",
    ),
    "torchrun gave another rank": (
        {"job.toml": JOB.replace('"dealer"]\n', '"dealer"]\n[mpc]\nrendezvous = "env://"\n', 1)
         .encode()},
        ["--party", "dealer"], TOKEN_ENV | TORCHRUN_ENV | {"RANK": "0"}, "--node-rank 2",
    ),
    "rendezvous away from the first party": (
        {"job.toml": (JOB + '[mpc]\nrendezvous = "tcp://10.1.1.1:29500"\n').encode()},
        ["--party", "dealer"], TOKEN_ENV, "first computing party",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("files", "args", "env", "culprit"), BAD_PARTY_INPUTS.values(), ids=BAD_PARTY_INPUTS.keys()
)
def test_party_rejects_bad_input_in_one_line_before_joining(
    tmp_path: Path, files: dict, args: list[str], env: dict, culprit: str
) -> None:
    files = {"job.toml": JOB.encode()} | files
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    before = _snapshot(tmp_path)
    result = _mpc_ft(["party", "--job", "job.toml", *args, "--out", "out"], tmp_path, env)
    _assert_one_line_error(result, culprit)
    assert _snapshot(tmp_path) == before  # no log, no output directory


def test_token_prints_or_writes_a_private_file_and_never_overwrites(tmp_path: Path) -> None:
    printed = _mpc_ft(["token"], tmp_path)
    assert printed.returncode == 0 and len(printed.stdout.strip()) == 64
    assert _mpc_ft(["token", "--out", "job.token"], tmp_path).returncode == 0
    token = (tmp_path / "job.token").read_text()
    assert len(token.strip()) == 64 and token.strip() != printed.stdout.strip()
    assert stat.S_IMODE((tmp_path / "job.token").stat().st_mode) == 0o600
    _assert_one_line_error(_mpc_ft(["token", "--out", "job.token"], tmp_path), "job.token")
    assert (tmp_path / "job.token").read_text() == token


def test_rank_gives_torchruns_node_rank_by_name(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(JOB)
    ranks = [_mpc_ft(["rank", "--job", "job.toml", "--party", n], tmp_path).stdout.strip()
             for n in ("alice", "bob", "dealer")]  # fmt: skip
    assert ranks == ["0", "1", "2"]


def test_sample_data_shards_the_default_dataset_and_never_overwrites(tmp_path: Path) -> None:
    args = ["sample-data", "--owners", "alice,bob", "--train-size", "40", "--test-size", "20"]
    result = _mpc_ft(args, tmp_path)
    assert result.returncode == 0, result.stderr
    train = [
        md.read_labelled_file(tmp_path / "data" / f"{n}.train.jsonl") for n in ("alice", "bob")
    ]
    assert sorted(len(t.texts) for t in train) == [20, 20]
    assert not set(train[0].texts) & set(train[1].texts)
    before = _snapshot(tmp_path)
    _assert_one_line_error(_mpc_ft(args, tmp_path), "alice.train.jsonl")
    assert _snapshot(tmp_path) == before
