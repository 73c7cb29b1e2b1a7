"""DeepSpeed launcher worker: a ZeRO-3 training step of the tiny embedder where rank 0's batch
holds an image and rank 1's holds text only, recording each rank's embeddings next to those of
the whole (unpartitioned) model; for each model in turn, in one launch.

Usage: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/deepspeed_zero3_vision_worker.py \
           --model NAME=DIR [--model NAME=DIR ...] --out OUT_DIR      (writes OUT_DIR/NAME.RANK.pt)
"""
from __future__ import annotations

import argparse

import deepspeed
import torch
from PIL import Image

from umarvel import Embedder

ZERO3 = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--out", required=True)
    args, _ = parser.parse_known_args()
    deepspeed.init_distributed(dist_backend="gloo")
    for model in args.model:
        name, path = model.split("=", 1)
        zero3_step(path, f"{args.out}/{name}.{torch.distributed.get_rank()}.pt")


def zero3_step(model: str, out: str) -> None:
    rank = torch.distributed.get_rank()
    embedder = Embedder.from_pretrained(model, trainable=True)
    items = [{"image": Image.new("RGB", (56, 56), "red"), "text": "a red square"}, {"text": "a cat"}]
    if rank == 1:
        items = [{"text": "two dogs"}, {"text": "a cat"}]
    batch = embedder.collate(items)
    with torch.no_grad():
        whole = embedder(**batch)
    optimizer = torch.optim.SGD([p for p in embedder.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=embedder, optimizer=optimizer, config=ZERO3)
    outputs = []
    for _ in range(2):  # the second step runs on ZeRO-3's recorded module trace
        outputs.append(engine(**batch))
        engine.backward(outputs[-1].sum())
        engine.step()
    torch.save({"whole": whole, "partitioned": outputs[0].detach()}, out)


if __name__ == "__main__":
    main()
