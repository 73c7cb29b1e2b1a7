"""Build a tiny random checkpoint of a backbone family with a locally trained tokenizer.

Nothing can be fetched from a model hub here, yet every test and the demo need a real
checkpoint directory: same classes, same special tokens, same chat template and the real
processor as the full-size model, only small (~2 MB) and random. Same seed, same bytes.
The family's record (umarvel/backbones) says how to build each part.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from umarvel import backbones, profiles
from umarvel.errors import UmarvelError
from umarvel.modeling import release


RELEASE_VOCAB_MULTIPLE = 128  # Qwen2-VL pads its 151657-token vocabulary to 152064 rows
RELEASE_TEMPERATURE = 0.0204  # paper Table 12, after stage 3


def build_tiny_model(out: str | os.PathLike, seed: int = 0, family: str = backbones.DEFAULT,
                     layout: str = "umarvel") -> Path:
    """Write a tiny random checkpoint (model + tokenizer + processor) to `out`; deterministic.

    `layout="umarvel-release"` writes it as the released U-MARVEL checkpoints are laid out
    (see `_write_release_layout`), for the umarvel-release profile's tests.
    """
    from transformers import AutoModelForImageTextToText

    if layout not in profiles.LAYOUTS:
        raise UmarvelError(f"unknown tiny-model layout {layout!r}; choose one of {', '.join(profiles.LAYOUTS)}")
    record = backbones.get(family)
    release = profiles.get(layout, family) if layout != "umarvel" else None
    out = Path(out)
    tokenizer = record.build_tokenizer()
    config = record.tiny_config(tokenizer)
    if release:
        text = config.get_text_config()
        text.vocab_size = -(-(len(tokenizer) + len(profiles.RELEASE_TOKENS)) // RELEASE_VOCAB_MULTIPLE) * RELEASE_VOCAB_MULTIPLE
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record.tiny_processor(tokenizer).save_pretrained(out)
    if release:
        _write_release_layout(out, release.architectures[0])
    return out


def _write_release_layout(out: Path, architecture: str) -> None:
    """Rewrite a saved checkpoint as the releases are: a flat transformers-4.45 config.json
    naming the release `architecture`, the weights with the unused lm_head and the `sim.temp`
    temperature beside them. The tokenizer stays the base one (the profile adds its tokens)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((out / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "dtype", "layer_types"):
        text.pop(key, None)
    vision = {k: v for k, v in config.pop("vision_config").items() if k not in ("model_type", "dtype", "rope_parameters")}
    vision["in_chans"] = vision.pop("in_channels")
    config.pop("dtype", None)
    flat = {**config, **text, "architectures": [architecture], "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}, "vision_config": vision,
            "torch_dtype": "float32", "transformers_version": "4.45.2"}
    (out / "config.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    weights = load_file(out / "model.safetensors")
    weights[release.TEMPERATURE_KEY] = torch.tensor(RELEASE_TEMPERATURE)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
