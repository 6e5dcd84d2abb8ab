"""The handshake's pieces (mpc_ft/handshake.py) and the network helpers (mpc_ft/network.py),
without processes. tests/test_deploy.py runs them between real `mpc-ft party` processes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from mpc_ft import handshake, network
from mpc_ft.errors import BadInput
from mpc_ft.handshake import Hello

TOKEN = b"7e" * 32
NAMES = {0: "alice", 1: "bob", 2: "dealer"}


def _hellos(**changes: dict) -> list[Hello]:
    base = Hello("x", "f" * 64, "0.1.0", "0.4.1", "2.13.0", "bb", 8, 32, 10, 4, "n")
    hellos = []
    for name in ("alice", "bob", "carol", "dealer"):
        fields = {"name": name, "nonce": os.urandom(8).hex()} | changes.get(name, {})
        if name == "dealer":
            fields |= {"backbone": "", "tokens": 0, "width": 0, "train": 0, "test": 0}
        hellos.append(dataclasses.replace(base, **fields))
    return hellos


OWNERS = {"alice", "bob", "carol"}


def test_agreeing_hellos_pass():
    handshake.validate(_hellos(), OWNERS, max_tokens=8)


def test_a_minority_is_named_with_the_field():
    problems = handshake.mismatches(_hellos(bob={"torch": "2.12.0"}), OWNERS)
    assert problems == ["party 'bob' differs in torch version: 2.12.0 (the others: 2.13.0)"]


def test_a_tie_names_every_party():
    hellos = [h for h in _hellos(bob={"fingerprint": "e" * 64}) if h.name in ("alice", "bob")]
    (problem,) = handshake.mismatches(hellos, OWNERS)
    assert problem.startswith("parties differ in job fingerprint: 'alice' ffff")
    assert "'bob' eeee" in problem


def test_owner_fields_ignore_parties_without_data():
    """The dealer has no backbone: that is not a mismatch; an owner's other backbone is."""
    assert handshake.mismatches(_hellos(), OWNERS) == []
    (problem,) = handshake.mismatches(_hellos(carol={"backbone": "other"}), OWNERS)
    assert "party 'carol' differs in backbone identity" in problem


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bob": {"train": 0}}, "data owner 'bob' has no training examples"),
        ({n: {"tokens": 16} for n in OWNERS}, "has 16 tokens per example, the job says"),
        ({"alice": {"width": 64}}, "party 'alice' differs in feature width: 64"),
        ({"dealer": {"mpc_ft": "0.2.0"}}, "party 'dealer' differs in mpc-ft version"),
    ],
)
def test_validate_stops_on_each_problem(changes, message):
    with pytest.raises(BadInput, match="handshake failed") as e:
        handshake.validate(_hellos(**changes), OWNERS, max_tokens=8)
    assert message in str(e.value)


def test_hello_round_trip_and_malformed_hellos():
    hello = _hellos()[0]
    assert Hello.decode(hello.encode(), "alice") == hello
    for raw in (b"not json", b'{"name": "alice"}', b"[1, 2]", b"\xff"):
        with pytest.raises(BadInput, match="party 'mallory' sent a malformed hello"):
            Hello.decode(raw, "mallory")


def _raw() -> dict[int, bytes]:
    return {r: h.encode() for r, h in enumerate(_hellos()[:3])}


def test_tags_bind_the_token_the_rank_and_every_hello():
    raw = _raw()
    tag = handshake.tag(TOKEN, 0, raw)
    assert len(tag) == 32
    assert handshake.tag(TOKEN, 0, raw) == tag  # deterministic for one transcript
    assert handshake.tag(b"8f" * 32, 0, raw) != tag
    assert handshake.tag(TOKEN, 1, raw) != tag
    altered = dict(raw) | {2: raw[2].replace(b'"train": 10', b'"train": 11')}
    assert handshake.tag(TOKEN, 0, altered) != tag
    fresh = {r: h.encode() for r, h in enumerate(_hellos()[:3])}  # new nonces: a new tag
    assert handshake.tag(TOKEN, 0, fresh) != tag


def test_check_tags_names_the_party_without_the_token():
    raw = _raw()
    tags = {r: handshake.tag(TOKEN, r, raw) for r in raw}
    handshake.check_tags(TOKEN, NAMES, 0, raw, tags)
    tags[1] = handshake.tag(b"wrong" * 8, 1, raw)
    with pytest.raises(BadInput, match="party 'bob' does not know the job token"):
        handshake.check_tags(TOKEN, NAMES, 0, raw, tags)
    mine = {r: handshake.tag(b"wrong" * 8, r, raw) for r in raw}
    with pytest.raises(BadInput, match=r"this party's \('bob'\) job token differs"):
        handshake.check_tags(b"wrong" * 8, NAMES, 1, raw, tags | {1: mine[1]})


def test_read_token_prefers_the_file_and_never_accepts_a_short_one(tmp_path: Path):
    token_file = tmp_path / "job.token"
    token_file.write_text(" " + "a" * 64 + "\n")
    env = {handshake.TOKEN_ENV: "b" * 64}
    assert handshake.read_token(token_file, env) == b"a" * 64
    assert handshake.read_token(None, env) == b"b" * 64
    with pytest.raises(BadInput, match="no job token"):
        handshake.read_token(None, {})
    with pytest.raises(BadInput, match=r"\$MPC_FT_TOKEN: the token is 5 characters"):
        handshake.read_token(None, {handshake.TOKEN_ENV: "short"})
    with pytest.raises(BadInput, match="cannot read it"):
        handshake.read_token(tmp_path / "absent", env)


def test_new_tokens_are_long_and_fresh():
    a, b = handshake.new_token(), handshake.new_token()
    assert len(a) == 64 and a != b and int(a, 16) >= 0


# --- network.py ---------------------------------------------------------------------------


def test_parse_rendezvous():
    rdv = network.parse_rendezvous("tcp://10.99.0.1:29500", environ={})
    assert (rdv.host, rdv.port, rdv.hosted_by_launcher) == ("10.99.0.1", 29500, False)
    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    rdv = network.parse_rendezvous("env://", environ=env)
    assert (rdv.host, rdv.port, rdv.hosted_by_launcher) == ("node0", 29400, True)


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("env://", {}, "needs MASTER_ADDR and MASTER_PORT"),
        ("env://", {"MASTER_ADDR": "a", "MASTER_PORT": "x"}, "no valid port"),
        ("tcp://10.0.0.1", {}, "no valid port"),
        ("file:///tmp/rdv", {}, "expected tcp://host:port or env://"),
        ("10.0.0.1:29500", {}, "expected tcp://host:port"),
    ],
)
def test_bad_rendezvous_settings_are_errors_not_a_silent_world_of_one(url, env, message):
    with pytest.raises(BadInput, match=message):
        network.parse_rendezvous(url, environ=env)


def test_interfaces_and_the_plaintext_warning():
    addresses = network.interface_addresses()
    assert addresses.get("lo") == "127.0.0.1"
    assert network.choose_interface("127.0.0.1", "lo") == ("lo", "127.0.0.1")
    assert network.choose_interface("127.0.0.1", None) == (None, "127.0.0.1")
    with pytest.raises(BadInput, match="--interface nosuch0: no such interface"):
        network.choose_interface("127.0.0.1", "nosuch0")
    outside = {n: a for n, a in addresses.items() if not network.is_loopback(a)}
    for name, address in outside.items():  # a declared host address picks its interface
        assert network.choose_interface(address, None) == (name, address)
    assert network.plaintext_link_warning("alice", "127.0.0.1", secure_tunnel=False) is None
    assert network.plaintext_link_warning("alice", "10.0.0.1", secure_tunnel=True) is None
    warning = network.plaintext_link_warning("alice", "10.0.0.1", secure_tunnel=False)
    assert warning.startswith("WARNING: party 'alice' binds 10.0.0.1")
    assert "mpc.secure_tunnel = true" in warning


COMPUTING = {"alice", "bob", "carol"}


@pytest.mark.parametrize(
    ("resume", "held", "want"),
    [
        (False, {}, 0),  # a fresh start
        (True, {"alice": (4, 6), "bob": (4, 6), "carol": (2, 4)}, 4),  # carol crashed before 6
        (True, {"alice": (6,), "bob": (6,), "carol": (6,)}, 6),
    ],
)
def test_resume_step_is_the_newest_step_every_computing_party_holds(resume, held, want):
    hellos = _hellos(**{n: {"resume": resume, "checkpoints": s} for n, s in held.items()})
    hellos = [dataclasses.replace(h, resume=resume) for h in hellos]
    assert handshake.resume_step(hellos, COMPUTING) == want
    handshake.validate(hellos, OWNERS, max_tokens=8, computing=COMPUTING)


@pytest.mark.parametrize(
    ("resume", "held", "message"),
    [
        (True, {}, "--resume: no checkpoint step is held by every computing party"),
        (True, {"alice": (4,), "bob": (6,), "carol": (6,)}, "'alice': 4; 'bob': 6; 'carol': 6"),
        (False, {"bob": (2,)}, "party 'bob' holds checkpoints of this job"),
    ],
)
def test_resume_without_a_common_step_or_checkpoints_without_resume_stop(resume, held, message):
    hellos = _hellos(**{n: {"checkpoints": s} for n, s in held.items()})
    hellos = [dataclasses.replace(h, resume=resume) for h in hellos]
    with pytest.raises(BadInput, match=message):
        handshake.validate(hellos, OWNERS, max_tokens=8, computing=COMPUTING)


def test_parties_disagreeing_on_resume_are_named():
    problems = handshake.mismatches(_hellos(bob={"resume": True}), OWNERS)
    assert problems == ["party 'bob' differs in --resume: True (the others: False)"]


def test_checkpoint_steps_survive_the_hello_round_trip():
    hello = dataclasses.replace(_hellos()[0], resume=True, checkpoints=(2, 4))
    assert Hello.decode(hello.encode(), "alice") == hello
