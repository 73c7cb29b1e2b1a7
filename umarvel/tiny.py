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
    (its family's config.json layout, `sim.temp` beside the weights), for the umarvel-release
    profile's tests.
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
        architecture = release.layout_architectures[family]
        config = json.loads((out / "config.json").read_text())
        released = _RELEASE_CONFIGS[family](config, architecture)
        (out / "config.json").write_text(json.dumps(released, indent=2, sort_keys=True) + "\n")
        _add_temperature(out)
    return out


def _qwen3_release_config(config: dict, architecture: str) -> dict:
    """The config.json of U-MARVEL-Qwen3VL-4B-Instruct's layout: nested as transformers 4.57
    writes it (rope_scaling and rope_theta, no rope_parameters), naming the release
    `architecture`."""
    text = dict(config["text_config"])
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    vision = {k: v for k, v in config["vision_config"].items() if k != "rope_parameters"}
    return {**config, "architectures": [architecture], "text_config": text, "vision_config": vision,
            "transformers_version": "4.57.0"}


def _qwen2_release_config(config: dict, architecture: str) -> dict:
    """The config.json of U-MARVEL-Qwen2VL-7B-Instruct's layout: flat as transformers 4.45
    writes it, naming the release `architecture`."""
    config = dict(config)
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "dtype", "layer_types"):
        text.pop(key, None)
    vision = {k: v for k, v in config.pop("vision_config").items() if k not in ("model_type", "dtype", "rope_parameters")}
    vision["in_chans"] = vision.pop("in_channels")
    config.pop("dtype", None)
    return {**config, **text, "architectures": [architecture], "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}, "vision_config": vision,
            "torch_dtype": "float32", "transformers_version": "4.45.2"}


_RELEASE_CONFIGS = {"qwen2-vl": _qwen2_release_config, "qwen3-vl": _qwen3_release_config}


def _add_temperature(out: Path) -> None:
    """Save the `sim.temp` temperature beside the weights (and the unused lm_head), as the
    releases do. The tokenizer stays the base one (the profile adds its tokens)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights[release.TEMPERATURE_KEY] = torch.tensor(RELEASE_TEMPERATURE)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
