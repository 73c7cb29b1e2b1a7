"""DeepSpeed launcher worker: one ZeRO step (stage 2 or 3) of the stand-in embedder, with
GradCache and the gathered loss, recording the full gradients and the parameters before and
after the step.

Usage: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/deepspeed_gradcache_worker.py --stage 3 --out OUT.pt
"""
from __future__ import annotations

import argparse

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from contrastive_standin import SCENARIOS, StandInEmbedder, contrastive_loss, global_batch, shard
from umarvel.errors import UmarvelError

LEARNING_RATE = 0.5
# ZeRO-3 would keep parameters this small whole on every rank (persistence threshold): 0
# partitions every one of them, which is what the test is about.
ZERO_SECTIONS = {2: {"stage": 2}, 3: {"stage": 3, "stage3_param_persistence_threshold": 0}}
# (scenario, encode through the engine's forward instead of the bare module)
VARIANTS = {
    "gradcache_bare_module": ("gradcache_global_negatives_bidirectional", False),
    "gradcache_engine_forward": ("gradcache_global_negatives_bidirectional", True),
    "gradcache_uneven_bare_module": ("gradcache_uneven_own_negatives", False),
    "plain_engine_forward": ("uneven_global_negatives_bidirectional", True),
}


def deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": ZERO_SECTIONS[stage],
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 by default; the test wants plain SGD
        "steps_per_print": 1_000_000,
    }


def one_step(stage: int, scenario_name: str, through_engine: bool) -> dict:
    scenario = SCENARIOS[scenario_name]
    model = StandInEmbedder()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(stage))
    batch = shard(global_batch(), scenario.sizes, engine.global_rank)
    encode = (lambda chunk: engine(chunk["features"])) if through_engine else None
    try:
        output = contrastive_loss(engine.module, batch, scenario, encode=encode)
    except UmarvelError as error:  # raised on every rank alike, before any collective of the step
        engine.destroy()
        return {"scenario": scenario_name, "error": str(error)}
    engine.backward(output.loss)
    full_gradients = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    engine.step()
    after = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}
    engine.destroy()
    return {"scenario": scenario_name, "gradients": full_gradients, "before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=sorted(ZERO_SECTIONS), required=True)
    parser.add_argument("--out", required=True)
    args, _ = parser.parse_known_args()
    results = {name: one_step(args.stage, *variant) for name, variant in VARIANTS.items()}
    if torch.distributed.get_rank() == 0:
        torch.save({"learning_rate": LEARNING_RATE, "variants": results}, args.out)


if __name__ == "__main__":
    main()
