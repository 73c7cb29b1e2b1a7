"""Turn items into processor inputs, plus the mask of tokens the embedder pools over."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from umarvel.config import PromptConfig
from umarvel.data.prompts import render
from umarvel.errors import DataError


def load_image(image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Open (if a path) and resize an image into the configured pixel bounds, as Qwen2-VL expects."""
    from qwen_vl_utils import fetch_image

    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image: {err}", file=str(path)) from None
    return fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels})


def instruction_token_mask(offsets: torch.Tensor, attention_mask: torch.Tensor, spans: list) -> torch.Tensor:
    """Mark tokens whose characters lie inside each row's instruction span.

    `spans[i]` is (start, end) counted from the end of row i's text (see prompts.render); a
    row's text length is the largest character offset among its real tokens.
    """
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, span in enumerate(spans):
        if span is None:
            continue
        real = attention_mask[row].bool()
        length = int(offsets[row, real, 1].max())
        start, end = length - span[0], length - span[1]
        token_start, token_end = offsets[row, :, 0], offsets[row, :, 1]
        mask[row] = real & (token_start >= start) & (token_end <= end) & (token_end > token_start)
    return mask


class Collator:
    """items -> dict of tensors for the embedder: processor outputs + `pool_mask`.

    Picklable and free of CUDA state, so it runs inside DataLoader workers.
    """

    def __init__(self, processor, prompt: PromptConfig, mask_instruction: bool = True):
        self.processor = processor
        self.prompt = prompt
        self.mask_instruction = mask_instruction

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rendered = [render(item, self.prompt, self.processor.tokenizer) for item in items]
        images = [
            load_image(image, self.prompt.min_pixels, self.prompt.max_pixels)
            for r in rendered
            for image in r.images
        ]
        batch = self.processor(
            text=[r.text for r in rendered],
            images=images or None,
            padding=True,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_mm_token_type_ids=True,
        )
        offsets = batch.pop("offset_mapping")
        attention_mask = batch["attention_mask"]
        pool_mask = attention_mask.bool()
        if self.mask_instruction:
            pool_mask &= ~instruction_token_mask(offsets, attention_mask, [r.instruction_from_end for r in rendered])
        batch["pool_mask"] = pool_mask
        return dict(batch)
