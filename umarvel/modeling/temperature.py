"""The InfoNCE temperature as a module that trains, clamps, saves and loads with the embedder."""
from __future__ import annotations

import math

import torch
from torch import nn


class Temperature(nn.Module):
    """tau = clamp(exp(log_tau), min, max); learned in log space so steps are scale-free.

    When not learnable the value is a buffer, so optimizers and DDP never see it. The stored
    tensor has shape [1]: DeepSpeed's initial broadcast cannot handle 0-dim parameters.
    """

    def __init__(self, init: float = 0.05, learnable: bool = False, min: float = 0.005, max: float = 0.2):
        super().__init__()
        if not 0 < min <= init <= max:
            raise ValueError(f"temperature needs 0 < min <= init <= max, got min={min} init={init} max={max}")
        self.min, self.max, self.learnable = min, max, learnable
        log_tau = torch.tensor([math.log(init)], dtype=torch.float32)
        if learnable:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(self.min, self.max).squeeze(0)

    @property
    def value(self) -> float:
        return float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"value={self.value:.4f}, learnable={self.learnable}, min={self.min}, max={self.max}"
