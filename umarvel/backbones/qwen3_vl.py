"""Qwen3-VL (transformers' `qwen3_vl`): 16 px patches merged 2x2, so one visual token is 32x32 px.

Interleaved M-RoPE and DeepStack (vision features added to the first decoder layers' hidden
states at the image tokens) are the model's own: umarvel only passes the processor's outputs.
"""
from __future__ import annotations

import dataclasses

from umarvel.backbones import _qwen_vl as qwen, qwen2_vl

UNIT = 32
TINY_PIXELS = {"shortest_edge": 4 * UNIT * UNIT, "longest_edge": 16 * UNIT * UNIT}


def tiny_config(tokenizer):
    from transformers import Qwen3VLConfig

    head_dim = qwen.TEXT_HIDDEN // qwen.TEXT_HEADS
    text = {**qwen.tiny_text_config(tokenizer, qwen.tiny_rope(mrope_interleaved=True)), "head_dim": head_dim}
    vision = {
        **qwen.TINY_VISION,
        "patch_size": UNIT // 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],  # one DeepStack feature per tiny decoder layer
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, **qwen.vision_token_ids(tokenizer))


def tiny_processor(tokenizer):
    """The real Qwen3-VL processor (Qwen2-VL's image processor at 16 px patches) with small bounds."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(size=TINY_PIXELS, patch_size=UNIT // 2, merge_size=2)
    video_processor = Qwen3VLVideoProcessor(size=TINY_PIXELS, patch_size=UNIT // 2, merge_size=2)
    return Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=qwen.CHAT_TEMPLATE)


FAMILY = dataclasses.replace(
    qwen2_vl.FAMILY,
    name="qwen3-vl",
    model_type="qwen3_vl",
    model_class="Qwen3VLModel",
    generative_class="Qwen3VLForConditionalGeneration",
    patch_size=UNIT // 2,
    min_pixels=4 * UNIT * UNIT,
    max_pixels=300 * UNIT * UNIT,
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
)
