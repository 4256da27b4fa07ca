"""The rank helpers (distributed.py) on one process: where the rank and world size come from, collectives that are
no-ops without a process group, rank 0's decision handed to every rank, and naming a lost peer from an error's text.
Several real ranks: tests/test_tracking.py (a decision shared by two ranks), tests/test_cluster.py (lost nodes)."""

from __future__ import annotations

import pytest

from pipeline import distributed


def test_rank_world_size_and_local_rank_come_from_the_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if distributed._group() is None:  # no process group in this test process
        assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (3, 8, 1)


def test_without_a_process_group_collectives_are_identities(monkeypatch):
    monkeypatch.setattr(distributed, "_shared", lambda: None)
    assert distributed.mean_over_ranks(2.5) == 2.5 and distributed.any_rank(True) is True
    assert distributed.gather_objects([1, 2]) == [1, 2] and distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()


def test_rank_0_decides_and_other_ranks_get_the_default_without_a_group(monkeypatch):
    monkeypatch.setattr(distributed, "_shared", lambda: None)
    monkeypatch.setenv("RANK", "0")
    assert distributed.decided_on_rank0(lambda: "run-1", default=None) == "run-1"
    with pytest.raises(ValueError):
        distributed.decided_on_rank0(lambda: (_ for _ in ()).throw(ValueError("boom")))
    monkeypatch.setenv("RANK", "1")
    assert distributed.decided_on_rank0(lambda: pytest.fail("only rank 0 decides"), default="nobody") == "nobody"


def test_a_lost_peer_is_named_from_the_address_in_the_error():
    assert distributed.addresses_in("Read error [10.0.0.7]:41234: Connection reset by peer") == ["10.0.0.7"]
    assert distributed.addresses_in("[fe80::1]:5 and 10.0.0.8") == ["fe80::1", "10.0.0.8"]
    table = [
        {"rank": 0, "host": "a", "addr": "10.0.0.6", "addrs": ["10.0.0.6"], "node": 0},
        {"rank": 1, "host": "b", "addr": "10.0.0.7", "addrs": ["10.0.0.7"], "node": 1},
    ]
    assert distributed._ranks_at(["10.0.0.7"], table, me=0) == [1]
    assert distributed._describe([1], table) == "rank 1 (host b, 10.0.0.7, node 1)"
