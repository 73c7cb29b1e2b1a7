"""What the Qwen-VL families share: chat tokens, the tiny tokenizer, the GradCache batch split
and the attention switch. Each family module builds its record from these parts."""
from __future__ import annotations

from typing import TYPE_CHECKING

from umarvel.backbones import Chat
from umarvel.errors import UmarvelError

if TYPE_CHECKING:
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
VISION_START = "<|vision_start|>"
CHAT = Chat(
    system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n",
    end="<|im_end|>",
    assistant="\n<|im_start|>assistant\n",
    image="<|vision_start|><|image_pad|><|vision_end|>",
    video="<|vision_start|><|video_pad|><|vision_end|>",
)
# The Qwen-VL chat layout: optional system turn, then turns of
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
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                "pixel_values_videos", "video_grid_thw")

VOCAB_SIZE = 3000
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4


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


def token_ids(tokenizer) -> dict[str, int]:
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}


def tiny_text_config(tokenizer, rope: dict) -> dict:
    """The tiny decoder's sizes (see DESIGN.md) with the family's `rope` parameters."""
    ids = token_ids(tokenizer)
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_HEADS // 2,
        "max_position_embeddings": 4096,
        "rope_parameters": rope,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def tiny_rope(**extra) -> dict:
    """M-RoPE of the tiny decoder: (temporal, height, width) sections summing to head_dim / 2."""
    half = TEXT_HIDDEN // TEXT_HEADS // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}


# The tiny vision tower of the families whose config names these sizes (Qwen2.5-VL, Qwen3-VL).
TINY_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": TEXT_HIDDEN}


def vision_token_ids(tokenizer) -> dict[str, int]:
    ids = token_ids(tokenizer)
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int | list[int], image_start_id: int) -> list[dict[str, torch.Tensor]]:
    """Split a collated batch into chunks of `chunk_size` items (or of the listed item counts), for GradCache.

    Rows split by index; images follow their rows (a row holds as many images as
    <|vision_start|> tokens, in order) and each image owns prod(grid_thw) patch rows of
    `pixel_values`. Trailing padding columns no row of the chunk uses are dropped.
    """
    from umarvel.training.gradcache import chunk_row_counts

    if "pixel_values_videos" in batch:
        raise UmarvelError("GradCache cannot split a batch with videos yet; train on image/text items "
                           "or set train.loss.gradcache_chunk_size and gradcache_chunk_tokens to 0")
    rows = batch["input_ids"].shape[0]
    images_per_row = (batch["input_ids"] == image_start_id).sum(dim=1).tolist()
    grid = batch.get("image_grid_thw")
    patches = grid.prod(dim=1).tolist() if grid is not None else []
    chunks = []
    image_index = patch_index = 0
    stop = 0
    for count in chunk_row_counts(rows, chunk_size):
        start, stop = stop, stop + count
        width = int(batch["attention_mask"][start:stop].sum(dim=1).max())
        chunk = {
            key: value[start:stop, :width]
            for key, value in batch.items()
            if key in ("input_ids", "attention_mask", "pool_mask", "mm_token_type_ids")
        }
        n_images = sum(images_per_row[start:stop])
        if n_images:
            n_patches = sum(patches[image_index : image_index + n_images])
            chunk["image_grid_thw"] = grid[image_index : image_index + n_images]
            chunk["pixel_values"] = batch["pixel_values"][patch_index : patch_index + n_patches]
            image_index += n_images
            patch_index += n_patches
        chunks.append(chunk)
    return chunks


def dummy_vision(visual: torch.nn.Module) -> None:
    """The vision tower on the smallest image it takes (one merged patch), output discarded."""
    import torch

    config = visual.config
    merge = config.spatial_merge_size
    weight = next(visual.parameters())
    pixels = torch.zeros(merge * merge, config.in_channels * config.temporal_patch_size * config.patch_size**2,
                         dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        visual(pixels, grid_thw=torch.tensor([[1, merge, merge]], device=weight.device))


def set_causal(decoder: torch.nn.Module, causal: bool) -> None:
    """Make the text decoder causal or bidirectional, for every kernel and batch shape.

    The config flag makes the mask builder emit a bidirectional (padding-only) mask; the
    per-module flag is what kernels driven by an `is_causal` switch (flash-attention, SDPA when
    no mask is materialised) read, so both are set and no backend or batch shape runs causal.
    """
    decoder.config.is_causal = causal
    for module in decoder.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal
