"""Tests for mpc_ft.config: the job file, its checks, fingerprint, ranks; and the demo's parties."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpc_ft.config import JobConfig, PartyConfig, job_from_dict, load_job
from mpc_ft.errors import BadInput
from mpc_ft.launch import demo_parties

PARTIES = """
[[party]]
name = "alice"
roles = ["data_owner"]

[[party]]
name = "bob"
roles = ["data_owner", "model_owner"]

[[party]]
name = "dealer"
roles = ["dealer"]
"""
JOB = 'name = "reviews"\nlabels = ["fresh", "rotten"]\n' + PARTIES


def _job(**sections) -> JobConfig:
    base = job_from_dict(
        {
            "name": "reviews",
            "labels": ["fresh", "rotten"],
            "party": [
                {"name": "alice", "roles": ["data_owner"]},
                {"name": "bob", "roles": ["data_owner", "model_owner"]},
                {"name": "dealer", "roles": ["dealer"]},
            ],
        }
    )
    return base.replace(**sections) if sections else base


def _write(tmp_path: Path, text: str | bytes, name: str = "job.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _roles(*pairs: tuple[str, tuple[str, ...]]) -> tuple[PartyConfig, ...]:
    return tuple(PartyConfig(name=n, roles=r) for n, r in pairs)


# ---------------------------------------------------------------- fingerprint and round trip


def test_fingerprint_is_stable_hex() -> None:
    a, b = _job(), _job()
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    int(a.fingerprint(), 16)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"train": {"lr": 0.06}}, id="train.lr"),
        pytest.param({"head": {"d_model": 32}}, id="head.d_model"),
        pytest.param(
            {
                "parties": _roles(
                    ("alice", ("data_owner", "model_owner")),
                    ("bob", ("data_owner",)),
                    ("dealer", ("dealer",)),
                )
            },
            id="party roles",
        ),
        pytest.param({"labels": ("rotten", "fresh")}, id="labels order"),
        pytest.param(
            {"mpc": {"provider": "TFP", "allow_insecure_provider": True}}, id="mpc.provider"
        ),
    ],
)
def test_fingerprint_changes_with_any_field(change: dict) -> None:
    changed = _job(**change)
    assert changed != _job()
    assert changed.fingerprint() != _job().fingerprint()


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(_job(), id="defaults"),
        pytest.param(
            _job(
                labels=("😀 happy", 'say "hi"\\', "é\ttab"),
                train={"lr": 1e-5, "epochs": 3},
                head={"ln_eps": 1e-6, "project_input": False},
                mpc={"precision_bits": 18, "timeout_s": 12.5},
            ),
            id="unusual values",
        ),
    ],
)
def test_toml_round_trip_keeps_config_and_fingerprint(tmp_path: Path, job: JobConfig) -> None:
    loaded = load_job(_write(tmp_path, job.to_toml()))
    assert loaded == job
    assert loaded.fingerprint() == job.fingerprint()


def test_load_job_reads_the_documented_example(tmp_path: Path) -> None:
    job = load_job(_write(tmp_path, JOB + "\n[train]\nepochs = 3\nlr = 1\n"))
    assert job.name == "reviews"
    assert job.labels == ("fresh", "rotten")
    assert [p.name for p in job.parties] == ["alice", "bob", "dealer"]
    assert job.train.epochs == 3
    assert job.train.lr == 1.0 and isinstance(job.train.lr, float)  # an int is a fine float
    assert job.model_owner.name == "bob"
    assert job.dealer is not None and job.dealer.name == "dealer"
    assert [p.name for p in job.data_owners] == ["alice", "bob"]


# ---------------------------------------------------------------- bad job files

OWNERS_ONLY = PARTIES.split('[[party]]\nname = "dealer"')[0]  # alice and bob, no dealer
TFP_OK = '\n[mpc]\nprovider = "TFP"\nallow_insecure_provider = true\n'
ONE_COMPUTING = (
    'name = "j"\nlabels = ["a", "b"]\n'
    '[[party]]\nname = "alice"\nroles = ["data_owner", "model_owner"]\n'
    '[[party]]\nname = "dealer"\nroles = ["dealer"]\n'
)

BAD_JOBS = {
    "unknown top-level key": ("colour = 1\n" + JOB, "unknown key(s) colour in JobConfig"),
    "unknown key in a section": (JOB + "\n[train]\nepoch = 2\n", "epoch"),
    "unknown key in a party": (JOB.replace('name = "bob"', 'name = "bob"\nrole = 1'), "role"),
    "unknown section": (JOB + "\n[optimizer]\nlr = 1\n", "optimizer"),
    "unknown attention": (JOB + '\n[head]\nattention = "linear"\n', "head.attention"),
    "unknown activation": (JOB + '\n[head]\nactivation = "relu"\n', "head.activation"),
    "unknown norm": (JOB + '\n[head]\nnorm = "rms"\n', "head.norm"),
    "string for an int": (JOB + '\n[train]\nepochs = "2"\n', "epochs"),
    "bool for an int": (JOB + "\n[head]\nd_model = true\n", "d_model"),
    "float for an int": (JOB + "\n[train]\nbatch_size = 16.0\n", "batch_size"),
    "string for a bool": (JOB + '\n[mpc]\nallow_insecure_provider = "yes"\n', "allow_insecure"),
    "string for a list": (JOB.replace('["fresh", "rotten"]', '"fresh"'), "labels"),
    "missing name": (JOB.replace('name = "reviews"\n', ""), "name"),
    "missing labels": (JOB.replace('labels = ["fresh", "rotten"]\n', ""), "labels"),
    "missing party": ('name = "reviews"\nlabels = ["fresh", "rotten"]\n', "party"),
    "duplicate party names": (JOB.replace('name = "bob"', 'name = "alice"'), "duplicate"),
    "two model owners": (
        JOB.replace('roles = ["data_owner"]', 'roles = ["data_owner", "model_owner"]'),
        "model_owner",
    ),
    "no model owner": (JOB.replace(', "model_owner"', ""), "model_owner"),
    "unknown role": (JOB.replace('roles = ["data_owner"]', 'roles = ["owner"]'), "roles"),
    "dealer holding another role": (
        JOB.replace('roles = ["dealer"]', 'roles = ["dealer", "data_owner"]'),
        "dealer",
    ),
    "TTP provider without a dealer": ('name = "j"\nlabels = ["a", "b"]\n' + OWNERS_ONLY, "dealer"),
    "TFP without allow_insecure_provider": (
        'name = "j"\nlabels = ["a", "b"]\n' + OWNERS_ONLY + '\n[mpc]\nprovider = "TFP"\n',
        "allow_insecure_provider",
    ),
    "fewer than 2 computing parties": (ONE_COMPUTING, "at least 2"),
    "one label only": (JOB.replace('["fresh", "rotten"]', '["fresh"]'), "labels"),
    "duplicate labels": (JOB.replace('["fresh", "rotten"]', '["fresh", "fresh"]'), "labels"),
    "d_model not divisible by num_heads": (
        JOB + "\n[head]\nd_model = 30\nnum_heads = 4\n",
        "divisible",
    ),
    "zero epochs": (JOB + "\n[train]\nepochs = 0\n", "train.epochs"),
    "precision bits out of range": (JOB + "\n[mpc]\nprecision_bits = 40\n", "precision_bits"),
    "softmax attention over more tokens than its reciprocal resolves": (
        JOB + "\n[backbone]\nmax_tokens = 512\n",
        "backbone.max_tokens",
    ),
    "not TOML": ("name = reviews\n[[party\n", "TOML"),
    "not UTF-8": (b'name = "\xff\xfe"\n', "TOML"),
}


@pytest.mark.parametrize("text, expected", BAD_JOBS.values(), ids=BAD_JOBS.keys())
def test_load_job_rejects_bad_files_in_one_line_naming_the_file(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(BadInput) as info:
        load_job(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert expected in message


def test_load_job_rejects_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(BadInput, match="no such job file") as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: ")


def test_the_example_without_faults_loads(tmp_path: Path) -> None:
    """Guard for BAD_JOBS: each case is this file with one thing wrong."""
    load_job(_write(tmp_path, JOB))
    load_job(_write(tmp_path, 'name = "j"\nlabels = ["a", "b"]\n' + OWNERS_ONLY + TFP_OK))


def test_job_from_dict_names_where_it_came_from() -> None:
    with pytest.raises(BadInput, match=r"^demo options: .*unknown key\(s\) colour"):
        job_from_dict({**_job().to_dict(), "colour": 1}, where="demo options")


# ---------------------------------------------------------------- ranks and precision


def test_rank_puts_computing_parties_in_file_order_and_the_dealer_last(tmp_path: Path) -> None:
    dealer_first = (
        'name = "j"\nlabels = ["a", "b"]\n'
        '[[party]]\nname = "dealer"\nroles = ["dealer"]\n'
        '[[party]]\nname = "zed"\nroles = ["data_owner"]\n'
        '[[party]]\nname = "amy"\nroles = ["model_owner"]\n'
        '[[party]]\nname = "kim"\nroles = ["data_owner"]\n'
    )
    job = load_job(_write(tmp_path, dealer_first))
    assert {p.name: job.rank(p.name) for p in job.parties} == {
        "zed": 0,
        "amy": 1,
        "kim": 2,
        "dealer": 3,
    }
    assert _job().rank("alice") == 0 and _job().rank("bob") == 1 and _job().rank("dealer") == 2


def test_rank_of_an_unknown_party_names_the_known_ones() -> None:
    with pytest.raises(BadInput, match=r"'nobody'.*alice, bob, dealer") as info:
        _job().rank("nobody")
    assert "\n" not in str(info.value)


def test_precision_bits_16_for_any_party_count_and_explicit_wins() -> None:
    assert _job().precision_bits == 16
    three = _roles(
        ("alice", ("data_owner",)),
        ("bob", ("data_owner", "model_owner")),
        ("carol", ("data_owner",)),
        ("dealer", ("dealer",)),
    )
    assert _job(parties=three).precision_bits == 16
    assert _job(mpc={"precision_bits": 20}).precision_bits == 20


# ---------------------------------------------------------------- the demo's parties


@pytest.mark.parametrize(
    "owners, separate, expected",
    [
        (
            2,
            False,
            {"alice": ["data_owner"], "bob": ["data_owner", "model_owner"], "dealer": ["dealer"]},
        ),
        (
            3,
            False,
            {
                "alice": ["data_owner"],
                "bob": ["data_owner", "model_owner"],
                "carol": ["data_owner"],
                "dealer": ["dealer"],
            },
        ),
        (
            2,
            True,
            {
                "alice": ["data_owner"],
                "bob": ["data_owner"],
                "olivia": ["model_owner"],
                "dealer": ["dealer"],
            },
        ),
        (1, False, {"alice": ["data_owner"], "olivia": ["model_owner"], "dealer": ["dealer"]}),
    ],
    ids=["defaults", "3 owners", "separate model owner", "1 owner"],
)
def test_demo_parties(owners: int, separate: bool, expected: dict) -> None:
    parties = demo_parties(owners, separate)
    assert {p.name: list(p.roles) for p in parties} == expected
    assert [p.name for p in parties] == list(expected)  # the dealer comes last
    JobConfig(name="demo", labels=("a", "b"), parties=parties)  # a valid job


@pytest.mark.parametrize("owners", [0, -1, 9, 99])
def test_demo_parties_rejects_owner_counts(owners: int) -> None:
    with pytest.raises(BadInput, match=rf"^--data-owners {owners}: choose 1 to 8$"):
        demo_parties(owners, False)


def test_shipped_job_files_load():
    from pathlib import Path

    from mpc_ft.config import load_job

    files = sorted((Path(__file__).parent.parent / "parties").glob("*.toml"))
    assert files
    for path in files:
        job = load_job(path)
        assert job.dealer is not None and job.mpc.provider == "TTP"
    hosts = load_job(files[0].parent / "three_hosts.toml")
    assert [p.host for p in hosts.parties] == [f"10.99.0.{i}" for i in (1, 2, 3, 4)]
    assert hosts.mpc.secure_tunnel and hosts.rank("dealer") == 3


def test_private_files_resolve_paths_next_to_themselves(tmp_path: Path) -> None:
    from mpc_ft.config import load_private

    example = load_private(Path(__file__).parent.parent / "parties" / "private" / "alice.toml")
    assert example.interface == "wg0" and example.data.endswith("parties/private/alice.train.jsonl")
    (tmp_path / "p.toml").write_text(
        'data = "d.csv"\ntoken_file = "/etc/t"\nbackbone = "default"\n'
    )
    private = load_private(tmp_path / "p.toml")
    assert (private.data, private.token_file) == (str(tmp_path / "d.csv"), "/etc/t")
    assert (private.backbone, private.out) == ("default", "")
    (tmp_path / "bad.toml").write_text("data = 3\n")
    with pytest.raises(BadInput, match="data must be str"):
        load_private(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("rendezvous", "first_host", "ok"),
    [
        ("tcp://127.0.0.1:29500", "127.0.0.1", True),
        ("tcp://localhost:29500", "127.0.0.1", True),
        ("tcp://10.99.0.1:29500", "10.99.0.1", True),
        ("env://", "10.99.0.1", True),
        ("tcp://10.99.0.2:29500", "10.99.0.1", False),
        ("tcp://10.99.0.1", "10.99.0.1", False),
        ("nccl://10.99.0.1:1", "10.99.0.1", False),
    ],
)
def test_the_rendezvous_must_be_on_the_first_computing_partys_host(rendezvous, first_host, ok):
    from mpc_ft.config import job_from_dict

    data = {"name": "j", "labels": ["a", "b"], "mpc": {"rendezvous": rendezvous},
            "party": [{"name": "alice", "roles": ["data_owner"], "host": first_host},
                      {"name": "bob", "roles": ["model_owner"], "host": "10.99.0.7"},
                      {"name": "dealer", "roles": ["dealer"], "host": "10.99.0.8"}]}  # fmt: skip
    if ok:
        assert job_from_dict(data).mpc.rendezvous == rendezvous
    else:
        with pytest.raises(BadInput, match="rendezvous"):
            job_from_dict(data)


def test_long_sequences_need_native_attention_or_more_bits(tmp_path: Path) -> None:
    # the softmax's reciprocal over [1, 512] does not resolve at 16 bits; the native head never
    # divides by a secret token count, and 20 bits resolve it
    native = '\n[head]\nattention = "quad"\nactivation = "quad"\nnorm = "center"\n'
    assert load_job(_write(tmp_path, JOB + "\n[backbone]\nmax_tokens = 512\n" + native))
    wider = JOB + "\n[backbone]\nmax_tokens = 512\n[mpc]\nprecision_bits = 20\n"
    assert load_job(_write(tmp_path, wider, "wider.toml")).backbone.max_tokens == 512
