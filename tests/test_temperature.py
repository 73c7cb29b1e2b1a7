"""The learnable temperature follows the paper: at stage 1c's rate and step count (4e-4, ~350
updates, warm-up + cosine) it falls from 0.05 below 0.03 when a lower one fits the data (the
paper reports 0.0206), and a bound never stops its gradient."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import get_scheduler

from umarvel import Embedder
from umarvel.modeling.temperature import Temperature
from umarvel.training.losses import info_nce

STAGE_1C_STEPS = 350  # 1.33M queries / global batch 3840
STAGE_1C_LR = 4e-4


def _batch_with_a_low_optimum(batch: int = 64, dim: int = 4, seed: int = 0):
    """Unit queries and noisy positives in 4 dimensions, where random in-batch negatives are
    sometimes close: the InfoNCE loss is lowest near tau = 0.012."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    positive = torch.nn.functional.normalize(query + 0.2 * noise, dim=-1)
    return query, positive


def _train_temperature(groups, temperature, steps=STAGE_1C_STEPS, lr=STAGE_1C_LR):
    query, positive = _batch_with_a_low_optimum()
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(0.05 * steps), num_training_steps=steps)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        info_nce(query, positive, temperature()).loss.backward()
        optimizer.step()
        scheduler.step()
        trajectory.append(temperature.value)
    return trajectory


def test_stage_1c_budget_takes_tau_from_005_below_003_through_the_embedders_groups(tiny_model_dir):
    embedder = Embedder.from_pretrained(tiny_model_dir, trainable=True, temperature={"init": 0.05, "learnable": True})
    groups = embedder.parameter_groups(weight_decay=0.0)  # temperature at the stage's rate (the default)
    query, positive = _batch_with_a_low_optimum()
    grid = [0.008, 0.012, 0.016, 0.02, 0.03, 0.05]
    assert min(grid, key=lambda tau: info_nce(query, positive, tau).loss.item()) < 0.02
    trajectory = _train_temperature(groups, embedder.temperature)
    assert trajectory[-1] < 0.03, trajectory[::50]


def test_its_own_learning_rate_is_used():
    slow, fast = (Temperature(0.05, learnable=True) for _ in range(2))
    _train_temperature([{"params": [slow.tau], "lr": 1e-5}], slow, steps=50)
    _train_temperature([{"params": [fast.tau], "lr": 1e-3}], fast, steps=50)
    assert 0.05 - slow.value < 1e-3 < 0.05 - fast.value


@pytest.mark.parametrize("start, bound", [(0.01, "min"), (0.2, "max")])
def test_a_tau_at_its_bound_still_gets_a_gradient_and_comes_back(start, bound):
    temperature = Temperature(init=start, learnable=True, min=0.01, max=0.2)
    query, positive = _batch_with_a_low_optimum()
    # a loss whose optimum lies strictly inside (0.01, 0.2): tau must leave the bound
    loss = lambda: (temperature() - 0.05) ** 2  # noqa: E731
    loss().backward()
    assert temperature.tau.grad.abs().item() > 0, f"no gradient at the {bound} bound"
    optimizer = torch.optim.Adam([temperature.tau], lr=1e-3)
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert 0.01 < temperature.value < 0.2
    temperature.tau.data.fill_(10.0)
    assert temperature.value == pytest.approx(0.2)
    assert info_nce(query, positive, temperature()).loss.isfinite()


def test_saved_log_tau_of_earlier_versions_loads(tmp_path):
    path = tmp_path / "temperature.safetensors"
    save_file({"log_tau": torch.tensor([math.log(0.0206)])}, str(path))
    from safetensors.torch import load_file

    temperature = Temperature(0.05, learnable=True)
    temperature.load_state(load_file(path))
    assert temperature.value == pytest.approx(0.0206)
    other = Temperature(0.0188, learnable=True)
    temperature.load_state(other.state())
    assert temperature.value == pytest.approx(0.0188)
