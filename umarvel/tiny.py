"""Build a tiny random Qwen2-VL (or Qwen2.5-VL) with a locally trained tokenizer.

Nothing can be fetched from a model hub here, yet every test and the demo need a real
Qwen2-VL checkpoint directory: same classes, same special tokens, same chat template and the
real processor as the 7B model, only small (~2 MB) and random. Same seed, same bytes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL chat layout: optional system turn, then turns of
# <|im_start|>role\n content <|im_end|>\n, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

VOCAB_SIZE = 3000
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16 * 28 * 28
FAMILIES = ("qwen2-vl", "qwen2.5-vl")


def _training_corpus() -> list[str]:
    """English text that ships with every Python: the interpreter's own help topics."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]


def build_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer, trained locally, wrapped as Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    model = bpe.model
    vocab = bpe.get_vocab()
    merges = [tuple(pair) if isinstance(pair, (tuple, list)) else tuple(pair.split(" ")) for pair in _merges_of(model)]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _merges_of(model) -> list:
    """Merges of a trained tokenizers BPE model (read back through its JSON form)."""
    import json

    from tokenizers import Tokenizer

    holder = Tokenizer(model)
    return json.loads(holder.to_str())["model"]["merges"]


def _text_config(vocab_size: int, token_ids: dict) -> dict:
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    half = head_dim // 2  # mrope_section (temporal, height, width) must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_HEADS // 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def build_config(family: str, tokenizer):
    """A Qwen2-VL / Qwen2.5-VL config of the working tiny sizes (see DESIGN.md)."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text = _text_config(len(tokenizer), ids)
    common = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": TEXT_HIDDEN}
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_processor(family: str, tokenizer):
    """The real Qwen2-VL processor (image + video processors) with small pixel bounds."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size)
    video_processor = Qwen2VLVideoProcessor(size=size)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor, chat_template=CHAT_TEMPLATE)
    return Qwen2VLProcessor(image_processor, tokenizer, video_processor, chat_template=CHAT_TEMPLATE)


def build_tiny_model(out: str | os.PathLike, seed: int = 0, family: str = "qwen2-vl") -> Path:
    """Write a tiny random checkpoint (model + tokenizer + processor) to `out`; deterministic."""
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = Path(out)
    tokenizer = build_tokenizer()
    config = build_config(family, tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(family, tokenizer).save_pretrained(out)
    return out
