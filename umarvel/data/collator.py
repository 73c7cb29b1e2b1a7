"""Turn items into model inputs, plus the mask of tokens the embedder pools over.

Rendered text is tokenised here piece by piece (`tokenize_rendered`): the template's special
tokens by id, everything else with special-token parsing off, so text from a dataset can
never inject a control token (a caption holding "<|image_pad|>" would otherwise crash, one
holding "<|im_end|>" silently end the turn).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from umarvel import profiles
from umarvel.backbones import Family
from umarvel.config import PromptConfig
from umarvel.data.prompts import RenderedItem, is_query, render
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


def _added_token_pattern(tokenizer) -> re.Pattern:
    """Every added token of `tokenizer` (chat and vision tokens, release markers), longest first."""
    contents = sorted({token.content for token in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
    return re.compile("|".join(re.escape(content) for content in contents))


def _pieces(rendered: RenderedItem, pattern: re.Pattern) -> list[tuple[int, int, bool]]:
    """(start, end, is_token) pieces of `rendered.text`: added tokens of the template, and the
    plain text runs between them (template text and user text merged, as a tokenizer that
    splits at added tokens sees them; user text is never searched for tokens)."""
    text, pieces, position = rendered.text, [], 0
    for user_start, user_end in [*rendered.user_spans, (len(text), len(text))]:
        for match in pattern.finditer(text, position, user_start):
            pieces.append((position, match.start(), False))
            pieces.append((match.start(), match.end(), True))
            position = match.end()
        pieces.append((position, user_end, False))
        position = user_end
    merged: list[tuple[int, int, bool]] = []
    for start, end, is_token in pieces:
        if is_token or start == end:
            if is_token:
                merged.append((start, end, True))
            continue
        if merged and not merged[-1][2]:
            merged[-1] = (merged[-1][0], end, False)
        else:
            merged.append((start, end, False))
    return merged


def tokenize_rendered(rendered: RenderedItem, tokenizer, pattern: re.Pattern) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, character offsets into `rendered.text`): template tokens by id, text runs
    tokenised with special-token parsing off, so user text can never become a control token.
    For text without special-token strings this equals tokenising the whole text at once."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, end, is_token in _pieces(rendered, pattern):
        if is_token:
            ids.append(tokenizer.convert_tokens_to_ids(rendered.text[start:end]))
            offsets.append((start, end))
            continue
        encoded = tokenizer(rendered.text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                            split_special_tokens=True)
        ids.extend(encoded["input_ids"])
        offsets.extend((start + a, start + b) for a, b in encoded["offset_mapping"])
    return ids, offsets


def encode_batch(processor, rendered: list[RenderedItem], images: list, max_tokens: list[int | None] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[list[tuple[int, int]]]]:
    """Rendered items -> (model inputs, per-row character offsets), right-padded.

    Images go through the processor's image processor; each <|image_pad|> of the template is
    expanded to the image's number of merged patches, as the processor does. `max_tokens[i]`
    cuts row i to that many tokens (None: never); a cut may not reach into image tokens.
    """
    tokenizer = processor.tokenizer
    pattern = _added_token_pattern(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    batch: dict[str, torch.Tensor] = {}
    counts: list[int] = []
    if images:
        batch.update(processor.image_processor(images=images, return_tensors="pt"))
        merge = processor.image_processor.merge_size
        counts = (batch["image_grid_thw"].prod(dim=-1) // (merge * merge)).tolist()
    rows, row_offsets, next_image = [], [], 0
    for index, item in enumerate(rendered):
        ids, offsets = tokenize_rendered(item, tokenizer, pattern)
        expanded_ids, expanded_offsets = [], []
        for token, offset in zip(ids, offsets):
            repeat = 1
            if token == image_id:
                repeat, next_image = counts[next_image], next_image + 1
            expanded_ids.extend([token] * repeat)
            expanded_offsets.extend([offset] * repeat)
        limit = max_tokens[index] if max_tokens else None
        if limit is not None and len(expanded_ids) > limit:
            if image_id in expanded_ids[limit:]:
                raise DataError(f"an item of {len(expanded_ids)} tokens is cut to {limit} (model.rules."
                                "candidate_max_tokens) inside its image tokens; raise the limit or prompt.max_pixels")
            expanded_ids, expanded_offsets = expanded_ids[:limit], expanded_offsets[:limit]
        rows.append(expanded_ids)
        row_offsets.append(expanded_offsets)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
    mm_token_type_ids = (input_ids == image_id).long() * attention_mask
    batch.update(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)
    return batch, row_offsets


def span_mask(offsets: list[list[tuple[int, int]]], width: int, spans: list[tuple[int, int] | None]) -> torch.Tensor:
    """Mark each row's tokens whose characters lie inside its span (rows without a span: none)."""
    mask = torch.zeros((len(offsets), width), dtype=torch.bool)
    for row, (row_offsets, span) in enumerate(zip(offsets, spans)):
        if span is None:
            continue
        for column, (start, end) in enumerate(row_offsets):
            mask[row, column] = span[0] <= start and end <= span[1] and end > start
    return mask


class Collator:
    """items -> dict of tensors for the embedder: model inputs + `pool_mask`.

    Follows the embedding profile's `rules` (umarvel/profiles.py; default umarvel's).
    Picklable and free of CUDA state, so it runs inside DataLoader workers.
    """

    def __init__(self, processor, prompt: PromptConfig, family: Family, mask_instruction: bool = True,
                 rules: profiles.Rules | None = None):
        self.processor = processor
        self.prompt = prompt
        self.family = family
        self.mask_instruction = mask_instruction
        self.rules = rules or profiles.UMARVEL.rules

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        rendered = [render(item, self.prompt, self.family.chat, tokenizer, self.rules) for item in items]
        images = [load_image(image, self.prompt, self.family) for r in rendered for image in r.images]
        limits = None
        if self.rules.truncation == "candidates":
            limits = [None if is_query(item) else self.rules.candidate_max_tokens for item in items]
        batch, offsets = encode_batch(self.processor, rendered, images, limits)
        pool_mask = batch["attention_mask"].bool()
        if self.mask_instruction:
            spans = [r.instruction_span for r in rendered]
            pool_mask &= ~span_mask(offsets, pool_mask.shape[1], spans)
        batch["pool_mask"] = pool_mask
        return batch


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

