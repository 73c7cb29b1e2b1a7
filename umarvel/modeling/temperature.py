"""The InfoNCE temperature as a module that trains, bounds, saves and loads with the embedder.

Why tau itself is the parameter (as in the reference code), not log tau: Adam moves a
parameter by about its learning rate per step, whatever the gradient's scale. In log space
at the paper's LoRA rate (4e-4, ~350 updates in stage 1c) tau can fall from 0.05 to ~0.047
at most, far from the paper's 0.0206; in tau units it can move ~0.07, so the paper's
trajectory (0.05 -> 0.0206 -> 0.0188 -> 0.0204 over stages 1c, 2, 3) is reachable at the
paper's rates and step counts. Its optimizer group may take its own rate
(`train.temperature_learning_rate`).

The bounds [min, max] are kept by a straight-through clamp: the forward value never leaves
them, and the gradient is the unclamped one, so a tau that reaches a bound is never stuck
there (a hard clamp's zero gradient would freeze it for good).
"""
from __future__ import annotations

import torch
from torch import nn


class Temperature(nn.Module):
    """tau in [min, max]; a parameter when learnable, else a buffer (no optimizer or DDP sees it).

    The stored tensor has shape [1]: DeepSpeed's initial broadcast cannot handle 0-dim parameters.
    """

    def __init__(self, init: float = 0.05, learnable: bool = False, min: float = 0.005, max: float = 0.2):
        super().__init__()
        if not 0 < min <= init <= max:
            raise ValueError(f"temperature needs 0 < min <= init <= max, got min={min} init={init} max={max}")
        self.min, self.max, self.learnable = min, max, learnable
        tau = torch.tensor([init], dtype=torch.float32)
        if learnable:
            self.tau = nn.Parameter(tau)
        else:
            self.register_buffer("tau", tau)

    def forward(self) -> torch.Tensor:
        tau = self.tau.float()
        bounded = tau.detach().clamp(self.min, self.max) + (tau - tau.detach())  # value clamped, gradient 1
        return bounded.squeeze(0)

    @property
    def value(self) -> float:
        return float(self.forward().detach())

    def state(self) -> dict[str, torch.Tensor]:
        """What `temperature.safetensors` holds (under ZeRO-3, call it with tau gathered)."""
        return {"tau": self.tau.detach().cpu().float().reshape(1).contiguous()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a saved temperature; files of umarvel 0.1 stored log tau."""
        tau = state["tau"] if "tau" in state else state["log_tau"].exp()
        with torch.no_grad():
            self.tau.copy_(tau.reshape(self.tau.shape).to(self.tau.dtype))

    def extra_repr(self) -> str:
        return f"value={self.value:.4f}, learnable={self.learnable}, min={self.min}, max={self.max}"

