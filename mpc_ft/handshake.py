"""The handshake: before gloo connects anyone and before any data is shared, every process of a
job proves it knows the job token and that it runs the same job, software and backbone.

Protocol (over the control plane's store, control.py; every process, dealer included):
1. Each process posts a hello: its party name, a fresh 32-byte nonce, the job fingerprint, its
   mpc-ft, CrypTen and torch versions, and, for data owners, the backbone identity (a hash of
   the model's config and weights, not its path) and feature shape, plus example counts.
2. When all hellos are in, each posts tag = HMAC-SHA256(token, "mpc-ft handshake v1" | rank |
   sha256 of all hellos in rank order). The token itself never crosses the wire; the fresh
   nonces make every tag single-use, and the tag covers every hello, so a hello altered on the
   way is caught too.
3. Each process checks every tag with its own token, then compares every field. All processes
   see the same hellos and tags, so all reach the same verdict: any mismatch stops every
   process with exit code 2 and one line naming the party and the field.

Hellos travel in the clear (public metadata: counts, shapes, hashes, versions); the rendezvous
port must be reachable by the parties only (see README, "Deploying across hosts").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections import Counter
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput

TOKEN_ENV = "MPC_FT_TOKEN"
MIN_TOKEN_CHARS = 32  # `mpc-ft token` makes 64 hex characters (256 bits)
_CONTEXT = b"mpc-ft handshake v1"


def new_token() -> str:
    return secrets.token_hex(32)


def read_token(path: Path | None, environ: dict[str, str] | None = None) -> bytes:
    """The job token from a file (first choice) or $MPC_FT_TOKEN; BadInput when there is none."""
    environ = os.environ if environ is None else environ
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.__class__.__name__
            raise BadInput(f"--token-file {path}: cannot read it ({reason})") from None
        where = f"--token-file {path}"
    elif environ.get(TOKEN_ENV):
        text, where = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        raise BadInput(f"no job token: give --token-file FILE or set ${TOKEN_ENV} (every party "
                       "of a job holds the same token; `mpc-ft token` makes one)")  # fmt: skip
    if len(text) < MIN_TOKEN_CHARS:
        raise BadInput(f"{where}: the token is {len(text)} characters; at least "
                       f"{MIN_TOKEN_CHARS} are needed (`mpc-ft token` makes one)")  # fmt: skip
    return text.encode()


def local_versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"mpc_ft": version("mpc-ft"), "crypten": version("crypten"), "torch": version("torch")}


@dataclass(frozen=True)
class Hello:
    name: str
    fingerprint: str
    mpc_ft: str
    crypten: str
    torch: str
    backbone: str = ""  # identity hash; data owners only
    tokens: int = 0
    width: int = 0
    train: int = 0
    test: int = 0
    nonce: str = ""
    resume: bool = False
    checkpoints: tuple[int, ...] = ()  # steps this computing party holds (checkpoint.py)
    client: str = ""  # mpc-ft infer: the party that gets the predictions (infer.py)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, sender: str) -> Hello:
        try:
            data = json.loads(raw)
            if set(data) != {f.name for f in fields(cls)}:
                raise ValueError("unexpected keys")
            data["checkpoints"] = tuple(data["checkpoints"])
            return cls(**data)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise BadInput(f"handshake: party {sender!r} sent a malformed hello "
                           "(not an mpc-ft process of this version?)") from None  # fmt: skip


# Fields every process must agree on, and fields the data owners must agree on.
FIELDS_ALL = {"fingerprint": "job fingerprint", "mpc_ft": "mpc-ft version",
              "crypten": "CrypTen version", "torch": "torch version",
              "resume": "--resume", "client": "inference client (--client)"}  # fmt: skip
FIELDS_OWNERS = {"backbone": "backbone identity", "tokens": "tokens per example",
                 "width": "feature width"}  # fmt: skip


def tag(token: bytes, rank: int, hellos: dict[int, bytes]) -> bytes:
    transcript = hashlib.sha256(b"".join(hellos[r] + b"\n" for r in sorted(hellos))).digest()
    return hmac.new(token, _CONTEXT + f"|{rank}|".encode() + transcript, "sha256").digest()


def check_tags(token: bytes, names: dict[int, str], me: int, hellos: dict[int, bytes],
               tags: dict[int, bytes]) -> None:  # fmt: skip
    """BadInput naming every process whose tag does not verify with this process's token."""
    bad = [r for r in sorted(tags) if not hmac.compare_digest(tags[r], tag(token, r, hellos))]
    if not bad:
        return
    others = [r for r in names if r != me]
    if set(others) <= set(bad) and len(others) > 1:  # everyone else disagrees: it is this token
        raise BadInput(f"handshake: this party's ({names[me]!r}) job token differs from every "
                       "other party's (wrong --token-file or $MPC_FT_TOKEN?)")  # fmt: skip
    who = ", ".join(repr(names[r]) for r in bad)
    raise BadInput(f"handshake: party {who} does not know the job token (HMAC check failed); "
                   "the job does not start")  # fmt: skip


def mismatches(hellos: list[Hello], owners: set[str]) -> list[str]:
    """One line per field where some parties differ from the rest, naming them."""
    problems = []
    for group, checked in ((hellos, FIELDS_ALL),
                           ([h for h in hellos if h.name in owners], FIELDS_OWNERS)):  # fmt: skip
        for key, label in checked.items():
            values = {h.name: getattr(h, key) for h in group}
            counts = Counter(values.values()).most_common()
            if len(counts) < 2:
                continue
            if counts[0][1] > counts[1][1]:  # a clear majority: name the others
                odd = {n: v for n, v in values.items() if v != counts[0][0]}
                problems.append(", ".join(f"party {n!r} differs in {label}: {_short(v)}"
                                          for n, v in odd.items())
                                + f" (the others: {_short(counts[0][0])})")  # fmt: skip
            else:
                problems.append(
                    f"parties differ in {label}: "
                    + ", ".join(f"{n!r} {_short(v)}" for n, v in values.items())
                )
    return problems


def _short(value: object) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 else text


def resume_step(hellos: list[Hello], computing: set[str]) -> int:
    """The step to continue from: the newest checkpoint every computing party holds (0: start
    afresh, without --resume). BadInput when --resume finds no common step, and when a party
    holds checkpoints of this job but --resume was not given (never silently start over)."""
    held = {h.name: set(h.checkpoints) for h in hellos if h.name in computing}
    listing = "; ".join(f"{n!r}: {', '.join(map(str, sorted(s))) or 'none'}"
                        for n, s in held.items())  # fmt: skip
    if not hellos[0].resume:
        holders = [n for n, s in held.items() if s]
        if holders:
            raise BadInput(f"party {', '.join(map(repr, holders))} holds checkpoints of this job "
                           f"({listing}): pass --resume to every party to continue, or move "
                           "the checkpoints away to start over")  # fmt: skip
        return 0
    common = set.intersection(*held.values())
    if not common:
        raise BadInput(f"--resume: no checkpoint step is held by every computing party "
                       f"({listing})")  # fmt: skip
    return max(common)


def validate(hellos: list[Hello], owners: set[str], max_tokens: int,
             computing: set[str] | None = None) -> None:  # fmt: skip
    """Stop (BadInput) on any mismatch, a data owner with nothing to train on, or checkpoints
    that do not allow the run asked for (resume_step)."""
    problems = mismatches(hellos, owners)
    for h in hellos:
        if h.name in owners and h.train < 1:
            problems.append(f"data owner {h.name!r} has no training examples")
        if h.name in owners and h.tokens != max_tokens:
            problems.append(f"data owner {h.name!r} has {h.tokens} tokens per example, the job "
                            f"says backbone.max_tokens = {max_tokens}")  # fmt: skip
    if problems:
        raise BadInput("handshake failed: " + "; ".join(problems))
    if computing:
        resume_step(hellos, computing)


def exchange(ctl: Any, job: JobConfig, hello: Hello, token: bytes,
             owners: set[str] | None = None) -> dict[int, Hello]:  # fmt: skip
    """Steps 1-3 over the control plane; every process's hello by rank, or BadInput.
    `owners`: the parties that bring data (default: the job's data owners; for private
    inference, the client; then checkpoints are not checked)."""
    ctl.put(f"hello/{ctl.rank}", hello.encode())
    raw = ctl.gather("hello", "hello")
    ctl.put(f"tag/{ctl.rank}", tag(token, ctl.rank, raw))
    tags = ctl.gather("tag", "handshake tag")
    try:
        check_tags(token, ctl.names, ctl.rank, raw, tags)
        hellos = {r: Hello.decode(b, ctl.names[r]) for r, b in raw.items()}
        wrong = [f"{ctl.names[r]!r} (joined as {h.name!r})" for r, h in hellos.items()
                 if h.name != ctl.names[r]]  # fmt: skip
        if wrong:
            raise BadInput(f"handshake: the job file places other parties at the rank of "
                           f"{', '.join(wrong)}")  # fmt: skip
        training = owners is None
        owners = {p.name for p in job.data_owners} if training else owners
        computing = {p.name for p in job.compute_parties} if training else None
        validate(list(hellos.values()), owners, job.backbone.max_tokens, computing)
    except BadInput:
        ctl.put(f"verdict/{ctl.rank}", b"fail")
        ctl.wait_for_verdicts()
        raise
    ctl.put(f"verdict/{ctl.rank}", b"ok")
    ctl.wait_for_verdicts()
    return hellos
