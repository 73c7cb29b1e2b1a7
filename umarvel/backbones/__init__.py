"""Backbone families: everything that differs between model families, in one record each.

A family is a module here exporting `FAMILY`, a `Family`; the rest of umarvel asks the record
(through `get`, `for_model_type` or `of`) and never names a family. To add one, write
`umarvel/backbones/<family>.py` and list it in `_MODULES`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from umarvel.errors import UmarvelError

_MODULES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEFAULT = "qwen2-vl"  # the paper's backbone family


@dataclass(frozen=True)
class Chat:
    """The chat layout: turn openers/closers and the placeholders an image and a video become."""

    system: str  # "{system}" is replaced by the system prompt
    user: str
    end: str
    assistant: str
    image: str
    video: str


@dataclass(frozen=True)
class Family:
    """One backbone family (see the module docstring).

    Classes are transformers class names, imported only when a model is loaded. Pixel limits
    are areas in pixels; `pixel_unit` is the side of the square one visual token covers.
    """

    name: str  # the CLI's --family value
    model_type: str  # config.json's model_type
    model_class: str  # bare model (embedder: no LM head)
    generative_class: str  # with the LM head (reranker)
    vision_tower: str  # attribute of the bare model holding the vision encoder
    language_model: str  # attribute of the bare model holding the text decoder
    chat: Chat
    vision_start: str  # the token opening each image in a row (GradCache follows it)
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    model_inputs: tuple[str, ...]  # processor outputs the model's forward takes
    split_batch: Callable  # (batch, chunk_size or item counts, vision_start_id) -> chunks, for GradCache
    set_causal: Callable  # (language model, causal: bool): switch bidirectional attention
    dummy_vision: Callable  # (vision tower): run it on a minimal image (ZeRO-3 ranks without images)
    tiny_config: Callable  # (tokenizer) -> a tiny transformers config of this family
    tiny_processor: Callable  # (tokenizer) -> this family's processor with tiny pixel limits
    build_tokenizer: Callable  # () -> a small locally trained tokenizer with the family's tokens
    # transformers image-processor backend: torchvision decodes, resizes and patches ~2x faster
    # than pil (equal within float rounding, tests/test_batches.py); every Qwen-VL family has it
    image_backend: str = "torchvision"

    @property
    def pixel_unit(self) -> int:
        return self.patch_size * self.merge_size

    def pixel_bounds(self, prompt) -> tuple[int, int]:
        """A prompt config's (min, max) pixels; 0 means the family's default."""
        return prompt.min_pixels or self.min_pixels, prompt.max_pixels or self.max_pixels

    def vision_start_id(self, tokenizer) -> int:
        return tokenizer.convert_tokens_to_ids(self.vision_start)

    def model_loader(self, with_lm_head: bool = False):
        """The transformers class to load this family with: bare, or with the LM head."""
        import transformers

        return getattr(transformers, self.generative_class if with_lm_head else self.model_class)


def _load() -> dict[str, Family]:
    records = [importlib.import_module(f"{__name__}.{module}").FAMILY for module in _MODULES]
    return {record.name: record for record in records}


FAMILIES: dict[str, Family] = _load()


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise UmarvelError(f"unknown backbone family {name!r}; umarvel supports {', '.join(FAMILIES)}")
    return FAMILIES[name]


def for_model_type(model_type: str, where: str = "the backbone") -> Family:
    """The family whose config.json says `model_type`; an error naming it and the supported ones."""
    for record in FAMILIES.values():
        if record.model_type == model_type:
            return record
    supported = ", ".join(f"{r.name} ({r.model_type})" for r in FAMILIES.values())
    raise UmarvelError(f"{where} is a {model_type!r} model, a family umarvel does not support; supported: {supported}")


def of(model) -> Family:
    """The family of a loaded (possibly PEFT-wrapped) model."""
    return for_model_type(model.config.model_type)
