"""Turn items into model inputs, plus the mask of tokens the embedder pools over.

Rendered text is tokenised here piece by piece (`tokenize_rendered`): the template's special
tokens by id, everything else with special-token parsing off, so text from a dataset can
never inject a control token (a caption holding "<|image_pad|>" would otherwise crash, one
holding "<|im_end|>" silently end the turn).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from PIL import Image

from umarvel import backbones, profiles
from umarvel.backbones import Family
from umarvel.config import PromptConfig
from umarvel.data.images import MAX_ASPECT_RATIO, check_aspect, open_image, pil_rgb, to_rgb
from umarvel.data.prompts import RenderedItem, is_query, render
from umarvel.data.video import load_video
from umarvel.errors import DataError


def load_image(image, prompt: PromptConfig, family: Family, official: bool = False) -> Image.Image:
    """Open (if a path) as RGB (umarvel.data.images) and resize an image into the prompt's pixel
    bounds, in whole visual tokens of the family's `pixel_unit`, as its processor expects; a
    shape the processor refuses is a DataError naming the file, before and after rounding.
    `family` is the one whose unit and bounds apply (rules.image_resize may name another than
    the backbone's; the processor then resizes into its own unit).

    `official` (model.rules.images=release): as the official U-MARVEL inference reads images
    (its copy of qwen-vl-utils, collators/qwen2_vision_process.py): PIL's convert("RGB"), and a
    side that rounding takes past MAX_ASPECT_RATIO times the other is cut to that many times it
    (the image squeezed), where umarvel refuses the image (a 7900x40 picture: 5600x28 there).
    """
    from qwen_vl_utils import fetch_image, smart_resize

    file = str(image) if isinstance(image, (str, Path)) else None
    convert = pil_rgb if official else to_rgb
    image = open_image(image, convert) if file is not None else convert(image, file)
    check_aspect(image.size, file)
    min_pixels, max_pixels = family.pixel_bounds(prompt)
    if official:
        height, width = smart_resize(image.height, image.width, factor=family.pixel_unit,
                                     min_pixels=min_pixels, max_pixels=max_pixels)
        height, width = min(height, width * MAX_ASPECT_RATIO), min(width, height * MAX_ASPECT_RATIO)
        resized = image.resize((width, height))
    else:
        # qwen_vl_utils rounds sides to image_patch_size x its 2x2 merge: the family's pixel unit
        resized = fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                              image_patch_size=family.patch_size)
    check_aspect(resized.size, file, resized=True)
    return resized


def _added_tokens(tokenizer) -> tuple[re.Pattern, dict[str, int]]:
    """A pattern matching every added token of `tokenizer` (chat and vision tokens, release
    markers; longest first), and their ids."""
    ids = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
    contents = sorted(ids, key=len, reverse=True)
    return re.compile("|".join(re.escape(content) for content in contents)), ids


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


def tokenize_rendered(items: list[RenderedItem], tokenizer, added: tuple[re.Pattern, dict[str, int]],
                      ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Per item (token ids, character offsets into its text): template tokens by id, text runs
    tokenised (all of a batch in one call) with special-token parsing off, so user text can
    never become a control token. For text without special-token strings this equals
    tokenising the whole text at once."""
    pattern, added_ids = added
    pieces = [_pieces(item, pattern) for item in items]
    texts = [item.text[start:end] for item, parts in zip(items, pieces) for start, end, is_token in parts if not is_token]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True) \
        if texts else {"input_ids": [], "offset_mapping": []}
    runs = iter(zip(encoded["input_ids"], encoded["offset_mapping"]))
    out = []
    for item, parts in zip(items, pieces):
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end, is_token in parts:
            if is_token:
                ids.append(added_ids[item.text[start:end]])
                offsets.append((start, end))
                continue
            run_ids, run_offsets = next(runs)
            ids.extend(run_ids)
            offsets.extend((start + a, start + b) for a, b in run_offsets)
        out.append((ids, offsets))
    return out


def _template_regions(rendered: RenderedItem) -> list[tuple[int, int]]:
    """The character ranges of `rendered.text` outside its user spans."""
    regions, position = [], 0
    for start, end in [*rendered.user_spans, (len(rendered.text), len(rendered.text))]:
        regions.append((position, start))
        position = end
    return regions


def _expand(rendered: RenderedItem, expansions: list[dict]) -> RenderedItem:
    """`rendered` with the template pieces the processor replaced swapped for its replacements
    (one token per merged patch, frame timestamps), spans moved along.

    `expansions` are the processor's `text_replacement_offsets` for the template alone: each
    says which characters it replaced (`span`, counted in the template without user text) and
    by what. Taking the span from the processor rather than searching for the placeholder
    ourselves keeps us right when a processor replaces more than the bare placeholder
    (Qwen3-VL from transformers 5.25 replaces a video's whole
    `<|vision_start|><|video_pad|><|vision_end|>`, as each frame brings its own pair).
    """
    # the character of `rendered.text` at each position of the template
    in_text = [position for start, end in _template_regions(rendered) for position in range(start, end)]
    cuts = []
    for expansion in expansions:
        start, end = expansion["span"]
        cuts.append((in_text[start], in_text[start] + end - start, expansion["replacement"]))

    def moved(position: int) -> int:
        return position + sum(len(new) - (end - start) for start, end, new in cuts if end <= position)

    pieces, last = [], 0
    for start, end, new in cuts:
        pieces += [rendered.text[last:start], new]
        last = end
    pieces.append(rendered.text[last:])
    span = rendered.instruction_span
    return dataclasses.replace(rendered, text="".join(pieces),
                               user_spans=[(moved(a), moved(b)) for a, b in rendered.user_spans],
                               instruction_span=None if span is None else (moved(span[0]), moved(span[1])))


def _video_inputs(videos: list[tuple[list, dict]]) -> dict:
    """Processor arguments for already sampled frames: their timing, and the per-frame pixel cap
    of qwen-vl-utils (the reference the released models were evaluated with)."""
    return {"videos": [frames for frames, _ in videos], "video_metadata": [meta for _, meta in videos],
            "do_sample_frames": False, "cap_pixels_per_frame": True}


def encode_batch(processor, rendered: list[RenderedItem], images: list, videos: list | None = None,
                 max_tokens: list[int | None] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rendered items -> (model inputs, the mask of each row's instruction-span tokens), right-padded.

    The processor handles the media and says what each placeholder expands to; it only sees
    the template (user text removed), so no user text can pass for a placeholder. The
    expanded prompts are then tokenised piecewise (`tokenize_rendered`). `max_tokens[i]` cuts
    row i to that many tokens (None: never); a cut may not reach into image or video tokens.
    """
    tokenizer = processor.tokenizer
    media = {"images": images or None, **(_video_inputs(videos) if videos else {})}
    templates = ["".join(r.text[a:b] for a, b in _template_regions(r)) for r in rendered]
    outputs = processor(text=templates, padding=True, return_tensors="pt", return_text_replacement_offsets=True, **media)
    replacements = outputs.pop("text_replacement_offsets")
    batch = {k: v for k, v in outputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    image_id, video_id = (tokenizer.convert_tokens_to_ids(t) for t in (processor.image_token, processor.video_token))
    media_ids = {image_id, video_id}
    expanded = [_expand(item, expansions) for item, expansions in zip(rendered, replacements)]
    rows, row_offsets = [], []
    for index, (ids, offsets) in enumerate(tokenize_rendered(expanded, tokenizer, _added_tokens(tokenizer))):
        limit = max_tokens[index] if max_tokens else None
        if limit is not None and len(ids) > limit:
            if media_ids & set(ids[limit:]):
                raise DataError(f"an item of {len(ids)} tokens is cut to {limit} (model.rules.candidate_max_tokens) "
                                "inside its image or video tokens; raise the limit or prompt.max_pixels")
            ids, offsets = ids[:limit], offsets[:limit]
        rows.append(ids)
        row_offsets.append(offsets)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
    # the processors' token types: 1 for image tokens, 2 for video tokens, 0 elsewhere
    mm_token_type_ids = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()
    batch.update(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids * attention_mask)
    return batch, span_mask(row_offsets, width, [item.instruction_span for item in expanded])


def span_mask(offsets: list[list[tuple[int, int]]], width: int, spans: list[tuple[int, int] | None]) -> torch.Tensor:
    """Mark each row's tokens whose characters lie inside its span (rows without a span: none)."""
    bounds = torch.zeros((len(offsets), width, 2), dtype=torch.long)
    for row, row_offsets in enumerate(offsets):
        if row_offsets:
            bounds[row, : len(row_offsets)] = torch.tensor(row_offsets, dtype=torch.long)
    limits = torch.tensor([span if span is not None else (-1, -1) for span in spans], dtype=torch.long)
    start, end = bounds[..., 0], bounds[..., 1]
    return (start >= limits[:, :1]) & (end <= limits[:, 1:]) & (end > start)


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
        resize = self.family if self.rules.image_resize == "family" else backbones.get(self.rules.image_resize)
        official = self.rules.images == "release"
        images = [load_image(image, self.prompt, resize, official) for r in rendered for image in r.images]
        videos = [load_video(video) for r in rendered for video in r.videos]
        limits = None
        if self.rules.truncation == "candidates":
            limits = [None if is_query(item) else self.rules.candidate_max_tokens for item in items]
        batch, instruction_mask = encode_batch(self.processor, rendered, images, videos, limits)
        pool_mask = batch["attention_mask"].bool()
        if self.mask_instruction:
            pool_mask &= ~instruction_mask
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

