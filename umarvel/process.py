"""This process's place in a launched job: rank, world size, barrier, cache root.

Before the process group exists (the Trainer or `launcher.launched_job` creates it), the
launcher's environment (RANK, WORLD_SIZE) says what this process will be; afterwards the
group does. Every module asks here, so "rank" means one thing everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _group_ready() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if _group_ready() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if _group_ready():
        dist.barrier()


def cache_root() -> Path:
    """Where umarvel keeps what it can rebuild (parsed tables, embeddings): $UMARVEL_CACHE, else
    ~/.cache/umarvel. Safe to delete; everything in it is re-made on the next run."""
    return Path(os.environ.get("UMARVEL_CACHE") or Path.home() / ".cache" / "umarvel")


def from_main(value):
    """The main process's `value` on every rank (itself in a single process): what rank 0
    decided, e.g. what to do with a run directory, so that no rank decides otherwise."""
    if not _group_ready():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any (so that all stop together, none hangs)."""
    if not _group_ready():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def use_cpu_threads(count: int) -> None:
    """torch's intra-op threads for this process's CPU work; 0 leaves torch's default."""
    if count and torch.get_num_threads() != count:
        torch.set_num_threads(count)
