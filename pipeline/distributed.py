"""Collectives every rank takes part in, on top of torch.distributed (started by `engine.init_distributed`), and
the one place that reads which rank this process is.

Each helper is a no-op on a single process, so the same code runs under one `python` and under a launcher.
`import pipeline.distributed` is cheap: torch is imported only by the helpers that move tensors. `rank()` and
`world_size()` are the one place that reads the launcher's RANK / WORLD_SIZE (engine.init_distributed sets them for a
bare `python`, so they always agree with the process group once it is up).
"""

from __future__ import annotations

import os
import sys


def _group():
    """torch.distributed when a process group is up, else None (without importing torch)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# What a launcher (deepspeed, torchrun, engine.init_distributed for a bare python) sets to place a process in its
# world: a process that starts a world of its own (a --parallel worker, a spawned job, a test's subprocess) drops them.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
)


def rank() -> int:
    """This process's global rank: the launcher's RANK (equal to the process group's), else the group's, else 0."""
    value = os.environ.get("RANK", "").strip()
    if value:
        return int(value)
    dist = _group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    """How many ranks run this job: the launcher's WORLD_SIZE (equal to the group's size), else the group's, else 1."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    if value:
        return int(value)
    dist = _group()
    return dist.get_world_size() if dist else 1


def local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK, set by the deepspeed launcher and torchrun; 0 without one)."""
    value = os.environ.get("LOCAL_RANK", "").strip()
    return int(value) if value.isdigit() else 0


def local_world_size() -> int:
    """How many ranks run on this node: LOCAL_WORLD_SIZE (torchrun), else LOCAL_SIZE (the deepspeed launcher, which
    sets no LOCAL_WORLD_SIZE: a 2-rank node counted as 1 in memory checks), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _shared():
    """torch.distributed when answers must travel between ranks (a group of several ranks), else None."""
    dist = _group()
    return dist if dist and dist.get_world_size() > 1 else None


def barrier() -> None:
    dist = _shared()
    if dist:
        dist.barrier()


def _all_reduce(value: float, op: str = "sum") -> float:
    """`value` reduced over the ranks (float64; on the GPU where the backend is NCCL, which reduces no CPU tensor)."""
    dist = _shared()
    if not dist:
        return value
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor.item()


def max_over_ranks(values: list[float]) -> list[float]:
    """The element-wise maximum of `values` over the ranks, in one all-reduce (every rank gets the same list)."""
    dist = _shared()
    if not dist:
        return list(values)
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def mean_over_ranks(value: float) -> float:
    return _all_reduce(value) / world_size()


def sum_over_ranks(value: float) -> float:
    return _all_reduce(value)


def average_gradients(params: list) -> None:
    """Replace each parameter's `.grad` by its mean over the ranks, in one all-reduce of one flat fp32 buffer (a
    missing gradient counts as zeros): data parallelism for the few trainable tensors of a replicated model
    (`--sharding replicate`), the averaging ZeRO does for `Engine`."""
    dist = _shared()
    if not dist or not params:
        return
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().float().reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank (so every rank takes the same branch)."""
    return _all_reduce(1.0 if flag else 0.0, "max") > 0


def all_ranks(flag: bool) -> bool:
    """True when the flag is set on every rank."""
    return _all_reduce(1.0 if flag else 0.0, "min") > 0


def gather_objects(items: list) -> list:
    """Concatenate per-rank Python lists on every rank (for evaluation outputs)."""
    dist = _shared()
    if not dist:
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def broadcast_object(obj):
    dist = _shared()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_on_rank0(fn, default=None, what: str = "rank 0"):
    """`fn()` run on rank 0 only; its answer (or its error, as a PipelineError naming `what`) reaches every rank, so
    that all take the same branch. Every rank must call it at the same point. Without a process group, ranks other
    than 0 get `default`."""
    shared = _shared() is not None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as exc:
            if shared:
                broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        if shared:
            broadcast_object(("ok", result))
        return result
    if not shared:
        return default
    kind, value = broadcast_object(None)
    if kind == "error":
        from pipeline.errors import PipelineError

        raise PipelineError(f"{what} failed on rank 0: {value}")
    return value


# ------------------------------------------------------------------------------------ naming a lost peer (clusters)
# When a node is lost, gloo/NCCL raise on the survivors with text that rarely says which rank is gone: a killed
# peer gives "Read error [10.0.0.7]:41234: Connection reset by peer" (an address, no rank), a peer whose link went
# down gives "Timed out waiting 60000ms for recv operation" (nothing at all), and in a ring collective a survivor may
# be told about another survivor that gave up first. So: `record_peers()` right after the process group starts
# gathers every rank's host and addresses; on a communication error `name_lost_peers()` asks the rendezvous store
# which ranks are still alive (each survivor checks in; the lost ones cannot) and names the missing ranks with their
# hosts. The gloo text's address is the fallback when the store cannot tell.

_PEERS: list[dict] | None = None
_ALIVE_PREFIX = "dept/alive/"


def _local_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses as the kernel lists them for this process's network namespace."""
    import socket
    from pathlib import Path

    found: list[str] = []
    try:  # /proc/net/fib_trie: an address line followed by "/32 host LOCAL" is one of ours
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in zip(lines, lines[1:]):
            if "/32 host LOCAL" in line:
                addr = prev.split()[-1]
                if not addr.startswith("127.") and addr not in found:
                    found.append(addr)
    except OSError:
        pass
    try:  # /proc/net/if_inet6: 32 hex digits per address; scope 00 is global
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "00":
                addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(parts[0]))
                if addr not in found:
                    found.append(addr)
    except (OSError, ValueError):
        pass
    return found


def _route_address(master: str) -> str:
    """The source address this host uses to reach `master` (a UDP connect sends nothing), or '' if unknown."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in master else socket.AF_INET
        infos = socket.getaddrinfo(master, 1, family, socket.SOCK_DGRAM)
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(infos[0][4])
            return sock.getsockname()[0]
    except OSError:
        return ""


def peer_info() -> dict:
    """This rank's identity for the peer table: rank, node (the launcher's node rank), host name, addresses."""
    import os
    import socket

    addr = _route_address(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    addrs = _local_addresses()
    if addr and addr not in addrs:
        addrs.insert(0, addr)
    node = os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "")))
    return {
        "rank": rank(),
        "node": int(node) if node.isdigit() else None,
        "host": socket.gethostname(),
        "addr": addr or (addrs[0] if addrs else ""),
        "addrs": addrs,
    }


def record_peers() -> list[dict]:
    """Gather every rank's `peer_info()` on every rank (a collective: call it on all ranks right after the process
    group starts) and keep the table for `name_lost_peers`. One process: its own entry."""
    global _PEERS
    mine = peer_info()
    dist = _shared()
    if not dist:
        _PEERS = [mine]
    else:
        table: list = [None] * dist.get_world_size()
        dist.all_gather_object(table, mine)
        _PEERS = table
    return list(_PEERS)


def peers() -> list[dict] | None:
    """The table `record_peers` gathered (rank -> host), or None before it ran."""
    return list(_PEERS) if _PEERS is not None else None


def addresses_in(text: str) -> list[str]:
    """Peer addresses quoted in a communication error ("[10.0.0.7]:41234", "[fe80::1]:5", bare IPv4), in order."""
    import re

    found: list[str] = []
    for match in re.finditer(r"\[([0-9A-Fa-f:.]+)\](?::\d+)?|\b((?:\d{1,3}\.){3}\d{1,3})\b", text):
        addr = match.group(1) or match.group(2)
        if addr not in found:
            found.append(addr)
    return found


def _describe(ranks: list[int], table: list[dict] | None) -> str:
    """'rank 3 (host node1, 10.0.0.7)' / 'ranks 2, 3 (host node1, 10.0.0.7)', grouped by host."""
    if not table:
        return ", ".join(f"rank {r}" for r in ranks)
    groups: dict[tuple, list[int]] = {}
    for r in ranks:
        entry = table[r] if 0 <= r < len(table) else {}
        groups.setdefault((entry.get("host", "?"), entry.get("addr", ""), entry.get("node")), []).append(r)
    parts = []
    for (host, addr, node), members in groups.items():
        label = ("rank " if len(members) == 1 else "ranks ") + ", ".join(map(str, members))
        where = ", ".join(x for x in (f"host {host}", addr, f"node {node}" if node is not None else "") if x)
        parts.append(f"{label} ({where})")
    return "; ".join(parts)


def _ranks_at(addresses: list[str], table: list[dict] | None, me: int) -> list[int]:
    if not table:
        return []
    hits = [
        e["rank"]
        for e in table
        if e["rank"] != me and any(a in e.get("addrs", []) or a == e.get("addr") for a in addresses)
    ]
    if not hits and any(a.startswith("127.") or a == "::1" for a in addresses):  # loopback: a rank of my host
        mine = table[me] if 0 <= me < len(table) else {}
        hits = [e["rank"] for e in table if e["rank"] != me and e.get("host") == mine.get("host")]
    return hits


def alive_ranks(grace_s: float = 5.0, store=None) -> list[int] | None:
    """Check this rank in at the rendezvous store and return the ranks that checked in within `grace_s` (this one
    included), or None when the store does not answer (the host of MASTER_ADDR is the one lost).

    Every survivor of a failed collective calls this: a lost rank cannot check in. Rank 0 (whose process holds the
    deepspeed launcher's store) waits the whole grace so that slower survivors still find the store."""
    import os
    import time
    from datetime import timedelta

    import torch.distributed as dist

    me, world = rank(), world_size()
    if world == 1:
        return [0]
    try:
        if store is None:
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=max(1.0, min(grace_s, 5.0))),
                wait_for_workers=False,
            )
        store.set(f"{_ALIVE_PREFIX}{me}", "1")
        count_key = _ALIVE_PREFIX + "count"
        store.add(count_key, 1)
    except Exception:  # noqa: BLE001 - any store failure means the same thing here: it is gone
        return None
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            if store.add(count_key, 0) >= world and me != 0:
                break
        except Exception:  # noqa: BLE001 - the store went away after we checked in: use what it said last
            break
        time.sleep(0.1)
    alive = []
    for r in range(world):
        try:
            if r == me or store.check([f"{_ALIVE_PREFIX}{r}"]):
                alive.append(r)
        except Exception:  # noqa: BLE001
            alive.append(r)  # unknown: do not accuse it
    return alive


def name_lost_peers(error: BaseException | str, grace_s: float = 5.0, store=None) -> str:
    """One phrase naming the ranks this rank lost contact with, for the error line a communication failure prints:
    'rank 1 (host node1, 10.0.0.7, node 1)'. Call it on every rank that caught the error (it checks in with the
    rendezvous store, up to `grace_s` seconds); falls back to the peer address quoted in the error text, then to
    'another rank'."""
    import os

    table = peers()
    me = rank()
    alive = alive_ranks(grace_s, store)
    if alive is None:  # the store does not answer: the host of MASTER_ADDR (rank 0's node) is gone
        master = os.environ.get("MASTER_ADDR", "?")
        holders = (
            [e["rank"] for e in table if master in e.get("addrs", []) or master == e.get("addr")] if table else []
        ) or [0]
        return f"{_describe(holders, table)}, whose rendezvous store at {master} does not answer"
    lost = [r for r in range(world_size()) if r not in alive]
    if lost:
        return _describe(lost, table)
    quoted = _ranks_at(addresses_in(str(error)), table, me)
    if quoted:
        return _describe(quoted, table) + " (named by the error; every rank checked in, so it may be a hang)"
    return "another rank"
