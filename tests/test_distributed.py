"""The gathered loss: a no-op in one process; over 2 gloo ranks, its rank-averaged gradients
equal the single-process full-batch gradients."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from contrastive_standin import (
    SCENARIOS,
    TEMPERATURE,
    StandInEmbedder,
    contrastive_loss,
    global_batch,
    max_difference,
    reference_gradients,
)
from distributed_loss_worker import THROUGH_DDP, WRONG_SCALES
from umarvel.training.distributed import gather, rank_layout

TESTS = Path(__file__).parent
TOLERANCE = 1e-5


def test_single_process_gather_is_a_no_op():
    layout = rank_layout(5)
    assert (layout.sizes, layout.offset, layout.world_size) == ((5,), 0, 1)
    assert layout.loss_scale == pytest.approx(1 / 5)
    tensor = torch.randn(5, 3, requires_grad=True)
    assert gather(tensor, layout) is tensor
    with pytest.raises(ValueError, match="holds 4 rows"):
        gather(tensor[:4], layout)
    with pytest.raises(ValueError, match="empty on rank"):
        rank_layout(0)


def test_single_process_loss_is_the_batch_mean():
    """The per-rank scaling reduces to the ordinary mean over queries in one process."""
    output = contrastive_loss(StandInEmbedder(), global_batch(), SCENARIOS["global_negatives"])
    assert output.loss.item() == pytest.approx(output.stats["loss_query_to_candidate"].item())


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gathered") / "gradients.pt"
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", str(TESTS / "distributed_loss_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS) + [f"ddp_{name}" for name in THROUGH_DDP])
def test_two_ranks_match_single_process_full_batch(two_rank_results, name):
    result = two_rank_results[name]
    scenario = SCENARIOS[result["scenario"]]
    difference = max_difference(result["gradients"], reference_gradients(scenario))
    assert difference < TOLERANCE, f"{name}: max gradient difference {difference:.2e}"
    assert result["gradients"][TEMPERATURE].abs().item() > 1e-3
    full_batch_loss = contrastive_loss(StandInEmbedder(), global_batch(), scenario).loss.item()
    assert result["loss"] == pytest.approx(full_batch_loss, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WRONG_SCALES))
def test_wrong_loss_scaling_is_caught(two_rank_results, name):
    result = two_rank_results[name]
    difference = max_difference(result["gradients"], reference_gradients(SCENARIOS[result["scenario"]]))
    assert difference > 100 * TOLERANCE, f"{name}: a wrong scaling went unnoticed ({difference:.2e})"
