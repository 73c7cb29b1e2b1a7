"""Attention mode: bidirectional means earlier tokens see later ones, causal means they do not.

Checked for every kernel we can run here, with and without padding, with and without images,
including the unpadded batch that the reference code silently encodes causally under SDPA.
"""
from __future__ import annotations

import pytest
import torch

from conftest import draw_image
from umarvel import backbones
from umarvel.backbone import load_backbone, load_processor
from umarvel.errors import UmarvelError

PROMPT = "<|im_start|>user\n{image}a small red circle near the {last}<|im_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _hidden(model, processor, texts, images):
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt", return_mm_token_type_ids=True)
    with torch.no_grad():
        return model(**batch, use_cache=False).last_hidden_state, batch["attention_mask"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_image", [False, True])
def test_later_token_reaches_earlier_only_when_bidirectional(family_model_dir, attn, attention, padded, with_image):
    model = load_backbone(family_model_dir, attn_implementation=attn, attention=attention).eval()
    processor = load_processor(family_model_dir)
    image_part = IMAGE if with_image else ""
    images = [draw_image("red")] if with_image else []
    filler = ["<|im_start|>user\na much longer second row that forces padding onto the first row<|im_end|>"] if padded else []
    filler_images = []
    h1, mask = _hidden(model, processor, [PROMPT.format(image=image_part, last="tree")] + filler, images + filler_images)
    h2, _ = _hidden(model, processor, [PROMPT.format(image=image_part, last="house")] + filler, images + filler_images)
    if padded:
        assert mask[0].sum() < mask.shape[1], "row 0 should be padded"
    first_text = 0  # <|im_start|>: the very first token
    changed = (h1[0, first_text] - h2[0, first_text]).abs().max().item()
    if attention == "bidirectional":
        assert changed > 1e-4
    else:
        assert changed < 1e-6


def test_flag_is_set_on_every_attention_module(family_model_dir):
    model = load_backbone(family_model_dir, attention="bidirectional")
    family = backbones.of(model)
    assert type(model).__name__ == family.model_class and not hasattr(model, "lm_head")
    decoder = getattr(model, family.language_model)
    flags = [m.is_causal for m in decoder.modules() if hasattr(m, "is_causal")]
    assert flags and not any(flags)
    assert model.config.text_config.is_causal is False
    generative = load_backbone(family_model_dir, attention="causal", with_lm_head=True)
    assert type(generative).__name__ == family.generative_class


def test_unsupported_family_names_it_and_the_supported_ones(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UmarvelError) as error:
        load_backbone(tmp_path)
    message = str(error.value)
    assert "'qwen2' model" in message and str(tmp_path) in message
    assert all(f"{name} ({backbones.get(name).model_type})" in message for name in backbones.names())


def test_not_a_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UmarvelError, match="no config.json"):
        load_backbone(tmp_path)
