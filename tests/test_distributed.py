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


def _average_on_rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fp32 = torch.zeros(3, requires_grad=True)
    bf16 = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)  # no gradient on rank 0: counts as zeros
    fp32.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    bf16.grad = torch.tensor([4.0, 8.0], dtype=torch.bfloat16) * (rank + 1)
    unused.grad = torch.tensor([2.0, 4.0]) if rank else None
    distributed.average_gradients([fp32, bf16, unused])
    torch.save({"fp32": fp32.grad, "bf16": bf16.grad, "unused": unused.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gradients_are_averaged_over_two_real_ranks_in_their_own_dtypes(tmp_path):
    """`--sharding replicate`'s data parallelism (#24): the mean over ranks, a missing gradient as zeros."""
    import torch
    import torch.multiprocessing as mp

    from pipeline.engine import _free_port

    mp.spawn(_average_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(grads["fp32"], torch.tensor([1.5, 3.0, 4.5]))
        assert grads["bf16"].dtype == torch.bfloat16 and torch.equal(grads["bf16"].float(), torch.tensor([6.0, 12.0]))
        assert torch.equal(grads["unused"], torch.tensor([1.0, 2.0]))


def test_the_ranks_on_this_node_come_from_torchrun_or_the_deepspeed_launcher(monkeypatch):
    """torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE only (memory per rank was shared by 1)."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert distributed.local_world_size() == 1
    monkeypatch.setenv("LOCAL_SIZE", "4")  # deepspeed.launcher.launch
    assert distributed.local_world_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun
    assert distributed.local_world_size() == 2
