"""Turn items into processor inputs, plus the mask of tokens the embedder pools over."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from umarvel.backbones import Family
from umarvel.config import PromptConfig
from umarvel.data.prompts import render
from umarvel.data.video import load_video
from umarvel.errors import DataError


def load_image(image, prompt: PromptConfig, family: Family) -> Image.Image:
    """Open (if a path) and resize an image into the prompt's pixel bounds, in whole visual
    tokens of the family's `pixel_unit`, as its processor expects."""
    from qwen_vl_utils import fetch_image

    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image: {err}", file=str(path)) from None
    min_pixels, max_pixels = family.pixel_bounds(prompt)
    # qwen_vl_utils rounds sides to image_patch_size x its 2x2 merge: the family's pixel unit
    return fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                       image_patch_size=family.patch_size)


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


def _video_inputs(videos: list[tuple[list, dict]]) -> dict:
    """Processor arguments for already sampled frames: their timing, and the per-frame pixel cap
    of qwen-vl-utils (the reference the released models were evaluated with)."""
    return {"videos": [frames for frames, _ in videos], "video_metadata": [meta for _, meta in videos],
            "do_sample_frames": False, "cap_pixels_per_frame": True}


class Collator:
    """items -> dict of tensors for the embedder: processor outputs + `pool_mask`.

    Picklable and free of CUDA state, so it runs inside DataLoader workers.
    """

    def __init__(self, processor, prompt: PromptConfig, family: Family, mask_instruction: bool = True):
        self.processor = processor
        self.prompt = prompt
        self.family = family
        self.mask_instruction = mask_instruction

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rendered = [render(item, self.prompt, self.family.chat, self.processor.tokenizer) for item in items]
        images = [
            load_image(image, self.prompt, self.family)
            for r in rendered
            for image in r.images
        ]
        videos = [load_video(video) for r in rendered for video in r.videos]
        batch = self.processor(
            text=[r.text for r in rendered],
            images=images or None,
            **(_video_inputs(videos) if videos else {}),
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


def id_tensor(ids: list[str | None]) -> torch.Tensor:
    """Document ids as int64 for false-negative masking (same id, same number, in every process)."""
    from umarvel.data.arrowtable import stable_hash64

    return torch.tensor([-1 if i is None else stable_hash64(i) & 0x7FFF_FFFF_FFFF_FFFF for i in ids], dtype=torch.long)


def _item_id(item: dict) -> str | None:
    return item.get("did") or item.get("qid")


class PairCollator:
    """Training examples {"query", "positive", "negatives"} -> one contrastive batch.

    Output: {"query": batch, "positive": batch, ["negative": batch of B*K items, query-major],
    "ids": {"positive": [B], "negatives": [B, K], "query_positives": [B, P] padded with -1}}.
    Every query brings exactly `num_negatives` negatives, so the [B, K] layout is fixed and
    the loss can never pair a query with another query's negatives by mistake.
    """

    def __init__(self, collator: Collator, num_negatives: int = 0):
        self.collator = collator
        self.num_negatives = num_negatives

    def __call__(self, examples: list[dict]) -> dict:
        queries = [e["query"] for e in examples]
        positives = [e["positive"] for e in examples]
        out = {"query": self.collator(queries), "positive": self.collator(positives)}
        query_positives = [list(q.get("pos_cand_list") or [_item_id(p)]) for q, p in zip(queries, positives)]
        width = max(len(p) for p in query_positives)
        ids = {
            "positive": id_tensor([_item_id(p) for p in positives]),
            "query_positives": torch.stack([id_tensor(p + [None] * (width - len(p))) for p in query_positives]),
        }
        if self.num_negatives:
            negatives = []
            for example in examples:
                own = example.get("negatives") or []
                if len(own) < self.num_negatives:
                    qid = example["query"].get("qid")
                    raise DataError(
                        f"query {qid} has {len(own)} negatives, the config asks for {self.num_negatives} "
                        "(data.num_negatives); mine more or lower it"
                    )
                negatives.extend(own[: self.num_negatives])
            out["negative"] = self.collator(negatives)
            ids["negatives"] = id_tensor([_item_id(n) for n in negatives]).view(len(examples), self.num_negatives)
        out["ids"] = ids
        return out


class DistillCollator:
    """Distillation examples {"query", "candidates", "teacher_scores"} -> one batch.

    Output: {"query": batch of B, "candidate": batch of B*C items, query-major (query 0's C,
    then query 1's C, ...), "teacher_scores": [B, C] float32, row b's column c scoring query b's
    candidate c}: the layout `losses.distillation_kl` reads. Every query must bring the same C.
    """

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        width = len(examples[0]["candidates"])
        for example in examples:
            qid = example["query"].get("qid")
            if len(example["candidates"]) != width:
                raise DataError(f"query {qid} has {len(example['candidates'])} teacher-scored candidates, the first "
                                f"query of its batch {width}: every query needs the same number (distill.top_k + 1)")
            if len(example["teacher_scores"]) != width:
                raise DataError(f"query {qid} has {len(example['teacher_scores'])} teacher scores for {width} candidates")
        return {
            "query": self.collator([e["query"] for e in examples]),
            "candidate": self.collator([c for e in examples for c in e["candidates"]]),
            "teacher_scores": torch.tensor([e["teacher_scores"] for e in examples], dtype=torch.float32),
        }

