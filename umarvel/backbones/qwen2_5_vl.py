"""Qwen2.5-VL (transformers' `qwen2_5_vl`): Qwen2-VL's layout and 28 px unit, windowed vision
attention."""
from __future__ import annotations

import dataclasses
from functools import partial

from umarvel.backbones import _qwen_vl as qwen, qwen2_vl


def tiny_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    vision = {**qwen.TINY_VISION, "window_size": 56, "fullatt_block_indexes": [1]}
    return Qwen2_5_VLConfig(text_config=qwen.tiny_text_config(tokenizer, qwen.tiny_rope()), vision_config=vision,
                            **qwen.vision_token_ids(tokenizer))


FAMILY = dataclasses.replace(
    qwen2_vl.FAMILY,
    name="qwen2.5-vl",
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLModel",
    generative_class="Qwen2_5_VLForConditionalGeneration",
    tiny_config=tiny_config,
    tiny_processor=partial(qwen2_vl.tiny_processor, processor_class="Qwen2_5_VLProcessor"),
    model_inputs=qwen.MODEL_INPUTS + ("second_per_grid_ts",),  # video frames' time step, for its M-RoPE
)
