"""Qwen2-VL (transformers' `qwen2_vl`): 14 px patches merged 2x2, so one visual token is 28x28 px."""
from __future__ import annotations

from umarvel.backbones import Family, _qwen_vl as qwen

UNIT = 28
TINY_PIXELS = {"shortest_edge": 4 * UNIT * UNIT, "longest_edge": 16 * UNIT * UNIT}


def tiny_config(tokenizer):
    from transformers import Qwen2VLConfig

    vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": qwen.TEXT_HIDDEN}
    return Qwen2VLConfig(text_config=qwen.tiny_text_config(tokenizer, qwen.tiny_rope()), vision_config=vision,
                         **qwen.vision_token_ids(tokenizer))


def tiny_processor(tokenizer, processor_class: str = "Qwen2VLProcessor"):
    """The real processor (image + video processors) with small pixel bounds."""
    import transformers
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(size=TINY_PIXELS)
    video_processor = Qwen2VLVideoProcessor(size=TINY_PIXELS)
    processor = getattr(transformers, processor_class)
    return processor(image_processor, tokenizer, video_processor, chat_template=qwen.CHAT_TEMPLATE)


FAMILY = Family(
    name="qwen2-vl",
    model_type="qwen2_vl",
    model_class="Qwen2VLModel",
    generative_class="Qwen2VLForConditionalGeneration",
    vision_tower="visual",
    language_model="language_model",
    chat=qwen.CHAT,
    vision_start=qwen.VISION_START,
    patch_size=14,
    merge_size=2,
    min_pixels=4 * UNIT * UNIT,
    max_pixels=300 * UNIT * UNIT,
    model_inputs=qwen.MODEL_INPUTS,
    split_batch=qwen.split_batch,
    set_causal=qwen.set_causal,
    dummy_vision=qwen.dummy_vision,
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
    build_tokenizer=qwen.build_tokenizer,
)
