"""The job: one frozen, typed configuration that every party loads, hashes and checks.

A job file is TOML. Every party holds an identical copy; `JobConfig.fingerprint()` hashes its
canonical form and the parties compare fingerprints before any data is shared. Private things (a
party's dataset path) are not part of the job.

    name = "rotten-tomatoes"
    labels = ["fresh", "rotten"]

    [[party]]
    name = "alice"
    roles = ["data_owner"]

    [[party]]
    name = "bob"
    roles = ["data_owner", "model_owner"]

    [[party]]
    name = "dealer"
    roles = ["dealer"]

    [backbone]  # optional sections: every field has a default
    layer = 4
    [head]
    d_model = 64
    [train]
    epochs = 2
    [mpc]
    rendezvous = "tcp://127.0.0.1:29500"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpc_ft.errors import BadInput

ROLES = ("data_owner", "model_owner", "dealer")
HEAD_REVEALS = ("model_owner", "nobody")
TRAIN_MODES = ("mpc", "federated")
# federated.max_examples / min_examples at most this: 1 / (total examples) is computed in fixed
# point over that range, with relative error up to about sqrt(ratio) * 2^-precision_bits
MAX_EXAMPLES_RATIO = 1024
NATIVE_HEAD = {"attention": "quad", "activation": "quad", "norm": "center"}  # README table
HEAD_CHOICES = {"attention": ("softmax", "quad"), "activation": ("gelu", "quad"),
                "norm": ("layernorm", "center")}  # fmt: skip


@dataclass(frozen=True)
class PartyConfig:
    name: str
    roles: tuple[str, ...]
    host: str = "127.0.0.1"  # the address peers reach this party at; gloo binds its interface


@dataclass(frozen=True)
class BackboneConfig:
    path: str = "default"  # "default": the packaged all-MiniLM-L6-v2; else a local HF model dir
    layer: int = 4  # hidden_states index (0 = embeddings); 4 beat MiniLM's last layer by ~3 points
    max_tokens: int = 32
    # Optional pin: the 16-hex identity (backbone.inspect_backbone; report.json's
    # backbone_identity) that every data owner's copy must have; "" accepts any copy
    identity: str = ""


@dataclass(frozen=True)
class HeadConfig:
    d_model: int = 64
    num_heads: int = 2
    d_ffn: int = 128
    num_blocks: int = 1
    project_input: bool = True  # False: the backbone width is the model width (no projection)
    ln_eps: float = 1e-5
    # The exact head (softmax, gelu, layernorm) computes the usual transformer up to fixed-point
    # error. MPC-native choices are cheap under MPC and trained natively (no approximation gap):
    # "quad" attention (s + c)^2 over its row sum (MPCFormer's 2Quad), "quad" activation
    # 0.125 x^2 + 0.25 x + 0.5 (MPCFormer), "center" normalisation (x - mean) * g + b (no
    # inverse square root). README: "Exact and MPC-native heads".
    attention: str = "softmax"
    activation: str = "gelu"
    norm: str = "layernorm"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 0.02  # with momentum 0.9: 72.7% twin accuracy vs 71.3% at 0.05 (1,200 RT examples)
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0  # the public batch order (the initial head: the model owner's private seed)
    # every N steps each computing party saves its shares (checkpoint.py); 0: never
    checkpoint_every: int = 0
    # every N steps the parameters are checked for fixed-point overflow on shares, revealing
    # one number (watchdog.py); a failure rolls back to the last good state. 0: never
    watchdog_every: int = 10
    # "mpc": the whole training on shares (train.py). "federated": FedAvg rounds, each data owner
    # training locally in plaintext and the updates averaged under MPC ([federated] section;
    # train.epochs is not used then). README: "Federated mode".
    mode: str = "mpc"


@dataclass(frozen=True)
class FederatedConfig:
    """train.mode = "federated" (mpc_ft/federated.py)."""

    rounds: int = 3
    local_epochs: int = 1  # each owner's epochs over its own data per round
    # Public bounds on the total number of training examples over all data owners. The parties
    # compute 1 / total under MPC by Newton's method over this range (the total itself is never
    # opened; one bit, whether it lies in the range, is). Ratio at most MAX_EXAMPLES_RATIO.
    min_examples: int = 64
    max_examples: int = 65536


@dataclass(frozen=True)
class MpcConfig:
    provider: str = "TTP"
    allow_insecure_provider: bool = False  # must be true to use TFP
    # Fractional bits of the fixed point. CrypTen's truncation of a product fails (a wild value)
    # with probability ~|x| 2^(2 bits - 64) per element for any number of parties (2: local
    # shares; 3+: the dealer's wrap count ignores the x + r wrap), measured: 20 bits gave wild
    # logits in ~1 of 5 steps of the reference head, 16 bits none.
    precision_bits: int = 16
    # tcp://host:port on the first computing party's host, which serves it; or env:// under
    # torchrun (MASTER_ADDR, MASTER_PORT). Every wait is bounded by timeout_s; a peer silent
    # for peer_timeout_s (no heartbeat) has failed, and every other party exits 3.
    rendezvous: str = "tcp://127.0.0.1:29500"
    timeout_s: float = 300.0
    peer_timeout_s: float = 30.0
    # true declares that every link between party hosts runs inside a tunnel that encrypts and
    # authenticates it (WireGuard, SSH); without it a non-loopback party prints a loud warning
    secure_tunnel: bool = False
    # A training step's Beaver triples from one dealer request before it, which the dealer
    # computes while the previous step runs (offline.py); false: one request per triple, as
    # CrypTen does (less memory: a step's triples are not held at once)
    triples_ahead: bool = True
    # A product's backward pass opens only its gradient, reusing the forward pass's openings
    # (products.py); false: CrypTen's own autograd (two fresh Beaver products per product)
    reuse_openings: bool = True


@dataclass(frozen=True)
class RevealConfig:
    head: str = "model_owner"  # or "nobody": the trained head stays secret-shared
    epoch_metrics: bool = True  # per-epoch mean loss and accuracy, as aggregates, to all parties


@dataclass(frozen=True)
class DpConfig:
    """DP-SGD on shares (dp.py); README "Differential privacy". Off unless enabled."""

    enabled: bool = False
    # > 0: calibrate noise_multiplier to this epsilon (then leave noise_multiplier 0);
    # 0: report the epsilon that noise_multiplier gives (noise_multiplier 0: clipping only)
    target_epsilon: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C: every microbatch's mean gradient is clipped to L2 norm C
    num_microbatches: int = 0  # per batch, as TF Privacy; 0: one per example (per-example)


@dataclass(frozen=True)
class JobConfig:
    name: str
    labels: tuple[str, ...]
    parties: tuple[PartyConfig, ...]
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mpc: MpcConfig = field(default_factory=MpcConfig)
    reveal: RevealConfig = field(default_factory=RevealConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    dp: DpConfig = field(default_factory=DpConfig)

    def __post_init__(self) -> None:
        _validate(self)

    # --- roles, by name -------------------------------------------------------------------
    @property
    def compute_parties(self) -> tuple[PartyConfig, ...]:
        """Every non-dealer party computes; their order in the job file is their MPC rank."""
        return tuple(p for p in self.parties if "dealer" not in p.roles)

    @property
    def data_owners(self) -> tuple[PartyConfig, ...]:
        return tuple(p for p in self.compute_parties if "data_owner" in p.roles)

    @property
    def model_owner(self) -> PartyConfig:
        return next(p for p in self.parties if "model_owner" in p.roles)

    @property
    def dealer(self) -> PartyConfig | None:
        return next((p for p in self.parties if "dealer" in p.roles), None)

    def party(self, name: str) -> PartyConfig:
        for p in self.parties:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.parties)
        raise BadInput(f"job {self.name!r}: no party named {name!r} (parties: {known})")

    def rank(self, name: str) -> int:
        """MPC rank of a party: computing parties in file order, then the dealer."""
        party = self.party(name)
        if "dealer" in party.roles:
            return len(self.compute_parties)
        return self.compute_parties.index(party)

    @property
    def precision_bits(self) -> int:
        """Fractional bits of CrypTen's fixed point for this job (see MpcConfig.precision_bits)."""
        return self.mpc.precision_bits

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    # --- identity ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 over the canonical JSON form (sorted keys, tuples as lists)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_toml(self) -> str:
        return _to_toml(self.to_dict())

    def replace(self, **sections: Any) -> JobConfig:
        """A copy with sections, or fields of sections, replaced: replace(train={'epochs': 3})."""
        changes = {}
        for key, value in sections.items():
            current = getattr(self, key)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                value = dataclasses.replace(current, **value)
            changes[key] = value
        return dataclasses.replace(self, **changes)


def _validate(job: JobConfig) -> None:
    where = f"job {job.name!r}"
    names = [p.name for p in job.parties]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInput(f"{where}: duplicate party name(s): {', '.join(duplicates)}")
    for p in job.parties:
        unknown = [r for r in p.roles if r not in ROLES]
        if not p.roles or unknown:
            raise BadInput(f"{where}: party {p.name!r} has unknown or no roles {list(p.roles)}")
        if "dealer" in p.roles and len(p.roles) > 1:
            raise BadInput(f"{where}: the dealer {p.name!r} may hold no other role")
    if len(job.compute_parties) < 2:
        raise BadInput(f"{where}: MPC needs at least 2 computing (non-dealer) parties")
    owners = [p.name for p in job.parties if "model_owner" in p.roles]
    if len(owners) != 1:
        raise BadInput(f"{where}: exactly one model_owner needed, found {owners or 'none'}")
    if not job.data_owners:
        raise BadInput(f"{where}: no data_owner")
    dealers = [p.name for p in job.parties if "dealer" in p.roles]
    if len(dealers) > 1:
        raise BadInput(f"{where}: more than one dealer: {dealers}")
    if job.mpc.provider not in ("TTP", "TFP"):
        raise BadInput(f"{where}: mpc.provider must be TTP or TFP, not {job.mpc.provider!r}")
    if job.mpc.provider == "TTP" and not dealers:
        raise BadInput(f"{where}: provider TTP needs a party with the dealer role")
    if job.mpc.provider == "TFP" and not job.mpc.allow_insecure_provider:
        raise BadInput(f"{where}: provider TFP is insecure; set mpc.allow_insecure_provider")
    if len(set(job.labels)) != len(job.labels) or len(job.labels) < 2:
        raise BadInput(f"{where}: labels must be at least 2 distinct names, got {job.labels}")
    for key, allowed in HEAD_CHOICES.items():
        if getattr(job.head, key) not in allowed:
            raise BadInput(f"{where}: head.{key} must be one of {allowed}")
    if job.head.d_model % job.head.num_heads:
        raise BadInput(f"{where}: head.d_model must be divisible by head.num_heads")
    if job.reveal.head not in HEAD_REVEALS:
        raise BadInput(f"{where}: reveal.head must be one of {HEAD_REVEALS}")
    if not job.reveal.epoch_metrics:  # training reveals them; refuse rather than ignore
        raise BadInput(f"{where}: reveal.epoch_metrics = false is not supported yet (training "
                       "reveals each epoch's mean loss and accuracy to all parties)")  # fmt: skip
    if job.backbone.identity and not re.fullmatch(r"[0-9a-f]{16}", job.backbone.identity):
        raise BadInput(f"{where}: backbone.identity must be 16 hex digits (report.json's "
                       "backbone_identity), or empty")  # fmt: skip
    positive = {
        "backbone.max_tokens": job.backbone.max_tokens,
        "head.d_model": job.head.d_model,
        "head.d_ffn": job.head.d_ffn,
        "head.num_blocks": job.head.num_blocks,
        "train.epochs": job.train.epochs,
        "train.batch_size": job.train.batch_size,
        "train.eval_batch_size": job.train.eval_batch_size,
        "train.lr": job.train.lr,
        "mpc.timeout_s": job.mpc.timeout_s,
        "mpc.peer_timeout_s": job.mpc.peer_timeout_s,
    }
    bad = [k for k, v in positive.items() if not v > 0]
    if bad:
        raise BadInput(f"{where}: {', '.join(bad)} must be positive")
    for key in ("checkpoint_every", "watchdog_every"):
        if getattr(job.train, key) < 0:
            raise BadInput(f"{where}: train.{key} must be 0 (off) or a number of steps")
    _check_rendezvous(job)
    _check_federated(job)
    _check_dp(job)
    if not 8 <= job.mpc.precision_bits <= 24:
        raise BadInput(f"{where}: mpc.precision_bits must be in [8, 24]")
    _check_reciprocals(job)


def _check_reciprocals(job: JobConfig) -> None:
    """The ranged reciprocals the job will need (ops.reciprocal_in_range) must resolve at its
    precision: 1 / row sum over [1, labels] (the cross-entropy) and, with softmax attention,
    over [1, max_tokens]."""
    from mpc_ft.cost_model import reciprocal_resolves

    bits, where = job.mpc.precision_bits, f"job {job.name!r}"
    ranges = [("the number of labels", len(job.labels))]
    if job.head.attention == "softmax":
        ranges.append(("backbone.max_tokens with softmax attention", job.backbone.max_tokens))
    for what, hi in ranges:
        if hi > 1 and not reciprocal_resolves(1.0, float(hi), bits):
            raise BadInput(f"{where}: {what} = {hi} is too many for a reciprocal over [1, {hi}] "
                           f"at mpc.precision_bits = {bits} (its Newton start would round to a "
                           "few units); use fewer, or more fractional bits")  # fmt: skip


def _check_federated(job: JobConfig) -> None:
    where, fed = f"job {job.name!r}", job.federated
    if job.train.mode not in TRAIN_MODES:
        raise BadInput(f"{where}: train.mode must be one of {TRAIN_MODES}, not {job.train.mode!r}")
    small = [k for k in ("rounds", "local_epochs", "min_examples") if getattr(fed, k) < 1]
    if small:
        raise BadInput(f"{where}: federated.{', federated.'.join(small)} must be at least 1")
    if not fed.min_examples <= fed.max_examples <= fed.min_examples * MAX_EXAMPLES_RATIO:
        raise BadInput(f"{where}: federated.max_examples must be between min_examples and "
                       f"{MAX_EXAMPLES_RATIO} x min_examples ({fed.min_examples}), not "
                       f"{fed.max_examples}")  # fmt: skip
    if job.train.mode == "federated" and job.reveal.head == "nobody":
        raise BadInput(f"{where}: reveal.head = 'nobody' cannot hold in federated mode, which "
                       "reveals the global head to every participant each round")  # fmt: skip


def _check_dp(job: JobConfig) -> None:
    dp, where = job.dp, f"job {job.name!r}: dp"
    if min(dp.target_epsilon, dp.noise_multiplier, dp.num_microbatches) < 0:
        raise BadInput(f"{where}.target_epsilon, noise_multiplier, num_microbatches must be >= 0")
    if dp.target_epsilon > 0 and dp.noise_multiplier > 0:
        raise BadInput(f"{where}: give target_epsilon or noise_multiplier, not both")
    if not dp.max_grad_norm > 0 or not 0 < dp.delta < 1:
        raise BadInput(f"{where}.max_grad_norm must be positive and dp.delta in (0, 1)")
    if dp.num_microbatches and job.train.batch_size % dp.num_microbatches:
        raise BadInput(f"{where}.num_microbatches {dp.num_microbatches} must divide "
                       f"train.batch_size {job.train.batch_size}")  # fmt: skip


def _check_rendezvous(job: JobConfig) -> None:
    """Syntax, and that a tcp:// rendezvous is on the host of the party that serves it."""
    from mpc_ft.network import is_loopback, parse_rendezvous

    url = job.mpc.rendezvous
    if url == "env://":
        return  # resolved at run time from MASTER_ADDR / MASTER_PORT (torchrun)
    host = parse_rendezvous(url, environ={}).host
    first = job.compute_parties[0]
    same = host == first.host or (is_loopback(host) and is_loopback(first.host))
    if not same:
        raise BadInput(f"job {job.name!r}: mpc.rendezvous {url} is not on the host of "
                       f"{first.name!r} ({first.host}), the first computing party, which serves "
                       "it")  # fmt: skip


@dataclass(frozen=True)
class PrivateConfig:
    """A party's private file: what only it has, never shared or hashed. Paths are relative to
    the file. Command-line flags override each key."""

    data: str = ""
    test_data: str = ""
    token_file: str = ""
    backbone: str = ""  # this host's copy of the job's backbone
    interface: str = ""  # the network interface gloo binds
    out: str = ""
    cache: str = ""
    # the model owner's seed for the initial head; -1: a fresh secret one. Never train.seed,
    # which every party holds: a head drawn from it would be known to all.
    init_seed: int = -1


def load_private(path: str | Path) -> PrivateConfig:
    path = Path(path)
    private = _build(PrivateConfig, _read_toml(path, "private party file"), str(path))
    paths = {k: v for k, v in dataclasses.asdict(private).items()
             if k not in ("interface", "init_seed")}  # fmt: skip
    resolve = {k: str(path.parent / v) for k, v in paths.items()
               if v and v != "default" and not Path(v).is_absolute()}  # fmt: skip
    return dataclasses.replace(private, **resolve)


# --- TOML -> dataclass, with types checked and nothing unknown accepted ----------------------


def load_job(path: str | Path) -> JobConfig:
    """Read a job file; BadInput (one line, naming the file) for anything wrong in it."""
    path = Path(path)
    return job_from_dict(_read_toml(path, "job file"), where=str(path))


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"{path}: not a readable TOML {what} ({e})") from None


def job_from_dict(data: dict[str, Any], where: str = "job") -> JobConfig:
    data = dict(data)
    if "party" in data:
        data["parties"] = data.pop("party")
    elif "parties" not in data:
        raise BadInput(f"{where}: no [[party]] tables")
    try:
        return _build(JobConfig, data, where)
    except BadInput as e:
        message = str(e)
        raise BadInput(message if message.startswith(where) else f"{where}: {message}") from None


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a table for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(unknown)} in {cls.__name__}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{where}: {name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadInput(f"{where}: missing key {name!r} in {cls.__name__}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise BadInput(f"{where} must be a list")
        return tuple(_coerce(item, v, where) for v in value)
    if origin in (types.UnionType, typing.Union):
        raise TypeError("unions are not used in job configs")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise BadInput(f"{where} must be true or false, not {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise BadInput(f"{where} must be {tp.__name__}, not {type(value).__name__} {value!r}")
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # ASCII; TOML's \UXXXXXXXX, as JSON's surrogate pairs are not TOML
        escaped = (c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}" for c in v)
        return '"' + "".join(escaped) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _to_toml(data: dict[str, Any]) -> str:
    top = {k: v for k, v in data.items() if k != "parties" and not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for party in data["parties"]:
        lines += ["", "[[party]]"] + [f"{k} = {_toml_value(v)}" for k, v in party.items()]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
