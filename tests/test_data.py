"""Tests for mpc_ft.data: reading files, bad inputs, Rotten Tomatoes, splits, shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from mpc_ft import data as md
from mpc_ft.errors import BadInput


def _toy(n_per_class: dict[str, int]) -> md.LabelledTexts:
    labels = [lb for lb, n in n_per_class.items() for _ in range(n)]
    texts = [f"text {i} {lb}" for i, lb in enumerate(labels)]
    return md.LabelledTexts(tuple(texts), tuple(labels), "toy")


# ---------------------------------------------------------------- reading good files


def test_csv_round_trip_int_labels_extra_columns_bom_quotes(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    content = (
        "id,text,label,extra\n"
        '1,"hello, world",0,x\n'
        '2,"two\nlines ""quoted""",1,y\n'
        "3,plain, 2 ,z\n"
        "4,again,0,w\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    data = md.read_labelled_file(path, min_classes=2)
    assert data.texts == ("hello, world", 'two\nlines "quoted"', "plain", "again")
    assert data.labels == ("0", "1", "2", "0")
    assert data.source == str(path)
    assert data.groups is None
    assert len(data) == 4
    assert md.label_names(data) == ("0", "1", "2")
    assert md.encode_labels(data, md.label_names(data)).tolist() == [0, 1, 2, 0]


def test_tsv_and_long_text(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    long = "word " * 50_000  # beyond csv's default field size limit
    path.write_text(f"label\ttext\na\t{long}\nb\tshort\n", encoding="utf-8")
    data = md.read_labelled_file(path)
    assert data.texts == (long, "short")
    assert data.labels == ("a", "b")


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [
        {"text": "a", "label": 0, "x": 1},
        {"label": "b", "text": "é\u2028z"},
        {"text": "c", "label": 2},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    data = md.read_labelled_file(path)
    assert data.texts == ("a", "é\u2028z", "c")
    assert data.labels == ("0", "b", "2")


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    data = md.LabelledTexts(('x, "y"\n', "ünï\u2028code", "  padded  "), ("a", "b", "a"), "mem")
    path = tmp_path / "out.jsonl"
    md.write_jsonl(data, path)
    back = md.read_labelled_file(path)
    assert back.texts == data.texts
    assert back.labels == data.labels
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left
    assert len(md.file_sha256(path)) == 64
    assert md.file_sha256(path) == md.file_sha256(str(path))


# ---------------------------------------------------------------- bad inputs

BAD_FILES = {
    # id: (file name, content bytes or None for special cases, keyword)
    "missing": ("nope.csv", None, "no such file"),
    "directory": ("dir.csv", "DIR", "directory"),
    "bad_suffix": ("data.txt", b"text,label\na,b\n", "unsupported"),
    "empty": ("empty.csv", b"", "empty"),
    "whitespace": ("blank.jsonl", b"  \n\n \t\n", "empty"),
    "header_only": ("header.csv", b"text,label\n", "no examples"),
    "no_text_col": ("notext.csv", b"body,label\na,b\n", "'text' column"),
    "no_label_col": ("nolabel.csv", b"text,y\na,b\n", "'label' column"),
    "dup_col": ("dup.csv", b"text,label,text\na,b,c\n", "duplicate"),
    "not_utf8": ("latin.csv", b"text,label\ncaf\xe9,a\n", "UTF-8"),
    "field_count": ("fields.csv", b"text,label\na,b,c\n", "fields"),
    "broken_quote": ("quote.csv", b'text,label\n"a"x,b\n', "malformed"),
    "empty_text_csv": ("et.csv", b"text,label\na,x\n   ,y\n", "empty text"),
    "empty_label_csv": ("el.csv", b"text,label\na,x\nb,  \n", "empty label"),
    "broken_json": ("bj.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", \n', "invalid JSON"),
    "json_not_object": ("no.jsonl", b'["a", "b"]\n', "not a JSON object"),
    "json_missing_key": ("mk.jsonl", b'{"text": "a"}\n', "'label'"),
    "json_empty_text": ("jt.jsonl", b'{"text": " ", "label": "a"}\n', "empty text"),
    "json_text_not_str": ("jn.jsonl", b'{"text": 5, "label": "a"}\n', "string"),
    "json_null_label": ("jl.jsonl", b'{"text": "a", "label": null}\n', "label"),
    "json_empty_label": ("je.jsonl", b'{"text": "a", "label": ""}\n', "empty label"),
    "one_class": ("one.csv", b"text,label\na,pos\nb,pos\n", "only 1 class"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input(tmp_path: Path, case: str) -> None:
    name, content, keyword = BAD_FILES[case]
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInput) as info:
        md.read_labelled_file(path, min_classes=2)
    message = str(info.value)
    assert message.startswith(str(path) + ":"), message
    assert keyword.lower() in message.lower(), message
    assert "\n" not in message


def test_line_numbers_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "lines.csv"
    path.write_text('text,label\n"multi\nline",a\nok,b\n ,c\n')
    with pytest.raises(BadInput, match="line 5: empty text"):
        md.read_labelled_file(path)
    path = tmp_path / "lines.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b"\n')
    with pytest.raises(BadInput, match="line 3: invalid JSON"):
        md.read_labelled_file(path)
    path = tmp_path / "bytes.csv"
    path.write_bytes(b"text,label\na,b\n\xff,c\n")
    with pytest.raises(BadInput, match="offset 15, line 3"):
        md.read_labelled_file(path)


def test_require_classes_and_encode_unknown_label() -> None:
    data = _toy({"a": 2, "b": 1})
    md.require_classes(data)
    with pytest.raises(BadInput, match=r"^toy: only 1 class \('a'\); need at least 2$"):
        md.require_classes(_toy({"a": 3}))
    with pytest.raises(BadInput, match=r"^toy: label 'b' \(example 3\) is not among .*: a, c$"):
        md.encode_labels(data, ["a", "c"])


def test_one_hot() -> None:
    out = md.one_hot(torch.tensor([2, 0]), 3)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0, 0, 1], [1, 0, 0]]


# ---------------------------------------------------------------- Rotten Tomatoes


def test_rotten_tomatoes_loads_and_splits_by_movie() -> None:
    rt = md.load_rotten_tomatoes()
    counts = Counter(rt.labels)
    assert set(counts) == {"fresh", "rotten"}
    assert len(rt) > 12_000
    assert abs(counts["fresh"] - 7403) < 50
    assert abs(counts["rotten"] - 5405) < 50
    assert rt.groups is not None
    assert rt.source == "rotten_tomatoes"
    assert all(t.strip() for t in rt.texts)
    train, test = md.split_by_group(rt, 0.2, seed=7)
    assert train.groups is not None
    assert test.groups is not None
    assert not set(train.groups) & set(test.groups)
    assert len(train) + len(test) == len(rt)
    assert abs(len(test) / len(rt) - 0.2) <= 0.05
    again = md.split_by_group(rt, 0.2, seed=7)
    assert again == (train, test)
    other = md.split_by_group(rt, 0.2, seed=8)[1]
    assert set(other.groups or ()) != set(test.groups)


def test_rotten_tomatoes_path_is_bz2() -> None:
    assert md.rotten_tomatoes_path().name == "rotten_tomatoes_corpus_full.csv.bz2"


def test_split_by_group_needs_groups() -> None:
    with pytest.raises(BadInput, match=r"^toy: .*groups"):
        md.split_by_group(_toy({"a": 3, "b": 3}), 0.5, seed=0)


# ---------------------------------------------------------------- splits, samples, shards


def test_stratified_split() -> None:
    data = _toy({"a": 30, "b": 10, "c": 5})
    train, test = md.stratified_split(data, 0.2, seed=1)
    assert Counter(test.labels) == {"a": 6, "b": 2, "c": 1}
    assert sorted(train.texts + test.texts) == sorted(data.texts)
    assert md.stratified_split(data, 0.2, seed=1) == (train, test)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(BadInput, match=r"^toy: .*fraction"):
            md.stratified_split(data, fraction, seed=1)
    with pytest.raises(BadInput, match=r"^toy: class 'c' .*none for test"):
        md.stratified_split(data, 0.05, seed=1)


@pytest.mark.parametrize("n", [1, 7, 10, 33, 44])
def test_stratified_sample_keeps_proportions(n: int) -> None:
    data = _toy({"a": 30, "b": 10, "c": 5})
    sample = md.stratified_sample(data, n, seed=3)
    assert len(sample) == n
    assert len(set(sample.texts)) == n
    counts = Counter(sample.labels)
    for label, total in Counter(data.labels).items():
        assert abs(counts[label] - n * total / len(data)) <= 1
    assert md.stratified_sample(data, n, seed=3) == sample


def test_stratified_sample_whole_set_is_shuffled_permutation() -> None:
    data = _toy({"a": 30, "b": 10})
    sample = md.stratified_sample(data, 100, seed=3)
    assert sorted(sample.texts) == sorted(data.texts)
    assert sample.texts != data.texts
    assert md.stratified_sample(data, 100, seed=3) == sample
    with pytest.raises(BadInput):
        md.stratified_sample(data, 0, seed=3)


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 45])
def test_shard_covers_each_example_once(parts: int) -> None:
    data = _toy({"a": 30, "b": 10, "c": 5})
    shards = md.shard(data, parts, seed=5)
    assert len(shards) == parts
    assert all(len(s) > 0 for s in shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    texts = [t for s in shards for t in s.texts]
    assert sorted(texts) == sorted(data.texts)
    assert len(set(texts)) == len(data)
    assert md.shard(data, parts, seed=5) == shards
    if parts == 3:
        assert all(Counter(s.labels)["a"] == 10 for s in shards)


def test_shard_too_many_parts() -> None:
    with pytest.raises(BadInput, match=r"^toy: cannot make 4 shards from 3 examples$"):
        md.shard(_toy({"a": 2, "b": 1}), 4, seed=0)


def test_subset_keeps_source_and_groups() -> None:
    data = md.LabelledTexts(("x", "y", "z"), ("a", "b", "a"), "src", ("g1", "g2", "g3"))
    sub = data.subset([2, 0])
    assert sub == md.LabelledTexts(("z", "x"), ("a", "a"), "src", ("g3", "g1"))
