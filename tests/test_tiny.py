"""The tiny backbone is a real, standard, deterministic Qwen2-VL checkpoint."""
from __future__ import annotations

import hashlib

from transformers import AutoModelForImageTextToText, AutoProcessor

from umarvel import backbones
from umarvel.backbones._qwen_vl import SPECIAL_TOKENS
from umarvel.tiny import build_tiny_model


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert digest(other)["model.safetensors"] != digest(tiny_model_dir)["model.safetensors"]
    assert digest(other)["tokenizer.json"] == digest(tiny_model_dir)["tokenizer.json"]


PROCESSORS = {"qwen2-vl": "Qwen2VLProcessor", "qwen2.5-vl": "Qwen2_5_VLProcessor", "qwen3-vl": "Qwen3VLProcessor"}


def test_loads_with_standard_auto_classes(family_model_dir):
    path = family_model_dir
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    family = backbones.for_model_type(model.config.model_type)
    assert type(processor).__name__ == PROCESSORS[family.name]
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == family.pixel_unit
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
