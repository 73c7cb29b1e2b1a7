"""torchrun worker: gradients of the gathered contrastive loss, averaged over ranks as DDP
averages them, for every scenario of `contrastive_standin.SCENARIOS`; the same through a real
DistributedDataParallel wrapper; and two deliberately wrong loss scalings the test must catch.

Usage: torchrun --standalone --nproc_per_node 2 tests/distributed_loss_worker.py OUT.pt
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from contrastive_standin import SCENARIOS, StandInEmbedder, contrastive_loss, global_batch, gradients, shard
from umarvel.training.distributed import RankLayout

WRONG_SCALES = {
    # Forgets that DDP divides the summed gradient by the number of ranks.
    "wrong_scale_ignores_world_size": ("global_negatives", lambda layout: 1.0 / layout.total),
    # Each rank's local mean: right only when every rank holds the same number of queries.
    "wrong_scale_local_mean_uneven": ("uneven_global_negatives_bidirectional", lambda layout: 1.0 / layout.local),
}


# Scenarios also run with the encoder wrapped in DDP (encode must call the wrapper).
THROUGH_DDP = ["global_negatives", "gradcache_global_negatives_bidirectional"]


def rank_averaged(scenario, through_ddp: bool = False) -> dict:
    model = StandInEmbedder()
    wrapped = DistributedDataParallel(model) if through_ddp else None
    encode = (lambda chunk: wrapped(chunk["features"])) if through_ddp else None
    output = contrastive_loss(model, shard(global_batch(), scenario.sizes, dist.get_rank()), scenario, encode=encode)
    output.loss.backward()
    averaged = gradients(model)
    loss = output.loss.detach().clone()
    for tensor in [loss] if through_ddp else [*averaged.values(), loss]:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return {"gradients": averaged, "loss": float(loss)}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    results = {name: {"scenario": name, **rank_averaged(scenario)} for name, scenario in SCENARIOS.items()}
    for name in THROUGH_DDP:
        results[f"ddp_{name}"] = {"scenario": name, **rank_averaged(SCENARIOS[name], through_ddp=True)}
    correct_scale = RankLayout.loss_scale
    for name, (scenario_name, wrong_scale) in WRONG_SCALES.items():
        RankLayout.loss_scale = property(wrong_scale)
        try:
            results[name] = {"scenario": scenario_name, **rank_averaged(SCENARIOS[scenario_name])}
        finally:
            RankLayout.loss_scale = correct_scale
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: gloo's worker threads may still drop a collective issued
    # during backward, whose saved context needs the GIL, and abort the process at exit
    # (torch 2.14, about one run in twenty; see pytorch/pytorch#179291).
    sys.stdout.flush()
    os._exit(0)
