"""Build a tiny random checkpoint of a backbone family with a locally trained tokenizer.

Nothing can be fetched from a model hub here, yet every test and the demo need a real
checkpoint directory: same classes, same special tokens, same chat template and the real
processor as the full-size model, only small (~2 MB) and random. Same seed, same bytes.
The family's record (umarvel/backbones) says how to build each part.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from umarvel import backbones


def build_tiny_model(out: str | os.PathLike, seed: int = 0, family: str = backbones.DEFAULT) -> Path:
    """Write a tiny random checkpoint (model + tokenizer + processor) to `out`; deterministic."""
    from transformers import AutoModelForImageTextToText

    record = backbones.get(family)
    out = Path(out)
    tokenizer = record.build_tokenizer()
    config = record.tiny_config(tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record.tiny_processor(tokenizer).save_pretrained(out)
    return out
