"""Gather embeddings across data-parallel ranks, with autograd, for the contrastive loss.

Each rank contrasts its local queries against the candidates of the *global* batch. The
gather is `all_gather_single` from `torch.distributed._functional_collectives`, whose
backward is a sum reduce-scatter: every rank's embeddings receive the gradient of every
rank's loss (checked on gloo/CPU with torch 2.14).

Loss scaling: DDP and DeepSpeed average gradients over ranks. With the gradient summed
through the gather, the averaged gradient equals the full-batch mean-loss gradient iff each
rank returns `layout.loss_scale * sum(local per-query losses)`, where
`loss_scale = world_size / global_batch`. With equal per-rank batches that is the local mean.

Uneven per-rank batch sizes (a short last batch) are handled: the sizes are gathered first,
every rank pads to the largest size, and padding rows are dropped after the gather. A rank
with no query at all is an error, raised on every rank alike (no rank is left waiting).

Without an initialised process group (or with one rank) every function here is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class RankLayout:
    """How the global batch is split over ranks: `sizes[r]` rows live on rank `r`."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Index of this rank's first row in the gathered (global) batch."""
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def loss_scale(self) -> float:
        """Multiply the sum of local per-query losses by this (see the module docstring)."""
        return self.world_size / self.total


def rank_layout(local_size: int, device: torch.device | str = "cpu") -> RankLayout:
    """Every rank's local batch size (one small all-gather); a single process needs none."""
    if not is_distributed():
        sizes: tuple[int, ...] = (local_size,)
        rank = 0
    else:
        size = torch.tensor([local_size], dtype=torch.int64, device=device)
        sizes = tuple(int(s) for s in _all_gather(size).tolist())
        rank = _rank()
    empty = [r for r, size in enumerate(sizes) if size == 0]
    if empty:
        raise ValueError(f"contrastive batch is empty on rank(s) {empty}; every rank needs at least one query")
    return RankLayout(sizes=sizes, rank=rank)


def _rank() -> int:
    return dist.get_rank()


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all) concatenated along dim 0 in rank order; its
    backward sums the gradients of all ranks. The one collective here (tests emulate it)."""
    return funcol.wait_tensor(funcol.all_gather_single(tensor, 0, dist.group.WORLD))


def gather(tensor: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order; differentiable.

    `tensor.shape[0]` must equal `layout.local`. Integer and bool tensors (ids, masks) gather
    the same way, without gradient.
    """
    if tensor.shape[0] != layout.local:
        raise ValueError(f"rank {layout.rank} holds {tensor.shape[0]} rows but its layout says {layout.local}")
    if layout.world_size == 1:
        return tensor
    as_bool = tensor.dtype == torch.bool
    if as_bool:
        tensor = tensor.to(torch.uint8)
    longest = max(layout.sizes)
    if tensor.shape[0] < longest:
        padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    gathered = _all_gather(tensor.contiguous())
    if any(size != longest for size in layout.sizes):
        rows = torch.cat(
            [torch.arange(size, device=gathered.device) + r * longest for r, size in enumerate(layout.sizes)]
        )
        gathered = gathered.index_select(0, rows)
    return gathered.bool() if as_bool else gathered
