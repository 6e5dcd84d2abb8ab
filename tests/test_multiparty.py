"""The multi-party harness itself (mpc_ft/multiparty.py's run_multiparty): what a failing or
hung party looks like to the test that started it, and where party processes come from."""

from __future__ import annotations

import os
import sys
import time

import pytest

from mpc_ft.multiparty import MultipartyError, run_multiparty


def _fail_at_rank_one(rank):
    if rank == 1:
        raise ValueError("party one's own failure")
    return rank


def _hang_at_rank_zero(rank):
    if rank == 0:
        time.sleep(600)
    return rank


def _die_at_rank_one(rank):
    if rank == 1:
        os._exit(7)
    time.sleep(600)  # the others would wait for it forever


def _where_am_i(rank):
    return os.getpid(), os.getppid(), "mpc_ft.preload" in sys.modules, "crypten" in sys.modules


def test_a_partys_exception_comes_back_with_its_rank_and_traceback():
    with pytest.raises(MultipartyError) as failure:
        run_multiparty(_fail_at_rank_one, parties=2, timeout_s=60)
    text = str(failure.value)
    assert "ranks [1]" in text and "--- rank 1 ---" in text
    assert "ValueError: party one's own failure" in text and "_fail_at_rank_one" in text


def test_a_hung_party_is_killed_at_the_deadline_and_named():
    start = time.monotonic()
    with pytest.raises(MultipartyError, match=r"--- rank 0 ---\ntimed out after 5 s"):
        run_multiparty(_hang_at_rank_zero, parties=2, timeout_s=5)
    assert time.monotonic() - start < 30


def test_a_party_process_that_dies_is_named_with_its_exit_code():
    start = time.monotonic()
    with pytest.raises(MultipartyError, match=r"--- rank 1 ---\nprocess exited with code 7"):
        run_multiparty(_die_at_rank_one, parties=2, timeout_s=120)
    assert time.monotonic() - start < 60


def test_parties_are_forked_from_one_server_with_crypten_loaded():
    """Not spawned afresh (4-6 s a session here, most of it importing torch and CrypTen): forked
    from a server that imported them once, the same server for every session."""
    first, second = (run_multiparty(_where_am_i, parties=3) for _ in range(2))
    pids = {pid for pid, _, _, _ in first + second}
    servers = {parent for _, parent, _, _ in first + second}
    assert len(pids) == 6 and len(servers) == 1 and servers != {os.getpid()}
    assert all(preloaded and crypten for _, _, preloaded, crypten in first + second)
