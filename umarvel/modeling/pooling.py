"""Pool a sequence of hidden states into one vector (paper Finding 1 and 2)."""
from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states where `pool_mask` is set (padding and, if asked, instructions excluded)."""
    weights = pool_mask.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp_min(1.0)
    return (hidden * weights).sum(dim=1) / counts


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (rows are right-padded)."""
    last = attention_mask.long().sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mean":
        return mean_pool(hidden, pool_mask)
    if method == "last":
        return last_token_pool(hidden, attention_mask)
    raise ValueError(f"pooling must be 'mean' or 'last', got {method!r}")
