"""The one place an item becomes model input text.

An item is a dict with any of `text`, `image` (path or PIL image, or a list of them: a
multi-image query), `video` (umarvel/data/video.py) and an optional `instruction`. It is
laid out in the backbone family's chat format (`Chat` in umarvel/backbones); for the
Qwen-VL families:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    [<|vision_start|><|image_pad|><|vision_end|> per image][<|vision_start|><|video_pad|><|vision_end|>]
    {instruction} {text}
    [\\nSummarize above image and sentence in one word:]<|im_end|>
    [\\n<|im_start|>assistant\\n]          (only with the compression prompt)

Images (then the video) always come first, so the instruction's character span, counted from
the END of the text, survives the processor's expansion of <|image_pad|> into one token per
image patch:
the collator uses it to find the instruction's tokens without adding tokens to the vocabulary.
Training, mining, distillation and evaluation all render through `render`, so they can never
disagree on the prompt (a known defect of the reference code).
The reranker's (query, candidate) pairs have their own layout, `render_pair`, below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from umarvel.backbones import Chat
from umarvel.config import PromptConfig

COMPRESSION = {
    "image": "Summarize above image in one word:",
    "text": "Summarize above sentence in one word:",
    "image,text": "Summarize above image and sentence in one word:",
    "video": "Summarize above video in one word:",
    "video,text": "Summarize above video and sentence in one word:",
}


@dataclass
class RenderedItem:
    """Model text for one item, its images, and where the instruction sits.

    `instruction_from_end` is (start, end) of the instruction measured backwards from the end of
    `text` (start > end), or None when the item carries no instruction.
    """

    text: str
    images: list[Any] = field(default_factory=list)
    instruction_from_end: tuple[int, int] | None = None
    videos: list[Any] = field(default_factory=list)


def modality(item: dict) -> str:
    visual = "video" if item.get("video") is not None else "image" if item.get("image") is not None else ""
    has_text = bool(item.get("text"))
    if visual and has_text:
        return f"{visual},text"
    if visual or has_text:
        return visual or "text"
    raise ValueError(f"item has neither text nor image: {item!r}")


def item_images(item: dict) -> list[Any]:
    """The item's images in order: `image` may be one image or a list of them."""
    image = item.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def truncate_text(text: str, tokenizer, max_tokens: int) -> str:
    """Cut `text` to at most `max_tokens` tokens at a token boundary (images are never cut)."""
    if max_tokens <= 0:
        return ""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens - 1][1]]


def _count_tokens(text: str, tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _instruction_and_text(item: dict, config: PromptConfig, tokenizer) -> tuple[str, str]:
    """The item's instruction (if used) and its text, cut so both fit `config.max_text_tokens`."""
    instruction = (item.get("instruction") or "").strip() if config.use_instruction else ""
    text = (item.get("text") or "").strip()
    if tokenizer is not None and text:
        budget = config.max_text_tokens - (_count_tokens(instruction, tokenizer) if instruction else 0)
        text = truncate_text(text, tokenizer, budget)
    return instruction, text


def _system(config: PromptConfig, chat: Chat) -> str:
    return chat.system.format(system=config.system_prompt) if config.system_prompt else ""


def render(item: dict, config: PromptConfig, chat: Chat, tokenizer=None) -> RenderedItem:
    """Lay out `item` as `chat` text; with a tokenizer, keep instruction + text within budget."""
    kind = modality(item)
    instruction, text = _instruction_and_text(item, config, tokenizer)

    prefix = _system(config, chat) + chat.user
    images = item_images(item)
    prefix += chat.image * len(images)
    videos = [item["video"]] if item.get("video") is not None else []
    prefix += chat.video * len(videos)
    body = " ".join(part for part in (instruction, text) if part)
    suffix = ""
    if config.compression_prompt:
        suffix = f"\n{COMPRESSION[kind]}"
    suffix += chat.end
    if config.compression_prompt:
        suffix += chat.assistant

    full = prefix + body + suffix
    span = None
    if instruction:
        start = len(full) - len(prefix)
        span = (start, start - len(instruction))
    return RenderedItem(text=full, images=images, instruction_from_end=span, videos=videos)


# ---- reranker pairs -----------------------------------------------------------------------

RERANK_QUESTION = "Does the candidate match the query? Answer YES or NO."


def render_pair(query: dict, candidate: dict, config: PromptConfig, chat: Chat, tokenizer=None) -> RenderedItem:
    """One (query, candidate) pair as the reranker's chat turn, ending in the assistant prompt:

        [<|im_start|>system\n{system}<|im_end|>\n]<|im_start|>user\n
        Query: [<image>]{instruction} {text}\n
        Candidate: [<image>]{text}\n
        Does the candidate match the query? Answer YES or NO.<|im_end|>\n<|im_start|>assistant\n

    The model's next token is its answer. Each side's text (the query's with its instruction)
    is cut to `config.max_text_tokens` on its own, so a long query never crowds out the
    candidate; image tokens are never cut. Training, scoring and evaluation all render here.
    """
    images, sides = [], []
    for label, item in (("Query", query), ("Candidate", candidate)):
        modality(item)  # an item with neither text nor image is an error, not an empty side
        instruction, text = _instruction_and_text(item, config, tokenizer)
        placeholder = ""
        if item.get("image") is not None:
            placeholder = chat.image
            images.append(item["image"])
        sides.append(f"{label}: {placeholder}" + " ".join(part for part in (instruction, text) if part))
    text = _system(config, chat) + chat.user + "\n".join(sides) + f"\n{RERANK_QUESTION}{chat.end}{chat.assistant}"
    return RenderedItem(text=text, images=images)


# ---- zero-shot suite (paper Tables 8 and 9) -----------------------------------------------

@dataclass(frozen=True)
class ZeroShotPrompt:
    """A zero-shot task's prompt choices: the instruction its queries carry, per search (or
    sub-task), and whether items end in the COMPRESSION suffix ("Summarize above ... in one
    word:"). The official evaluation uses the suffix on Flickr only; every task's candidates
    carry no instruction, as in M-BEIR."""

    instructions: dict[str, str]
    compression: bool = False


_CAPTION_TO_IMAGE = "Find me an everyday image that matches the given caption."
_IMAGE_TO_CAPTION = "Find an image caption describing the following everyday image."
_COMPOSED_CHANGE = "I'm looking for a similar everyday image with the described changes."
_TEXT_TO_VIDEO = "Find an everyday video match with caption."

ZEROSHOT: dict[str, ZeroShotPrompt] = {
    "flickr": ZeroShotPrompt({"t2i": _CAPTION_TO_IMAGE, "i2t": _IMAGE_TO_CAPTION}, compression=True),
    "mscoco": ZeroShotPrompt({"t2i": _CAPTION_TO_IMAGE, "i2t": _IMAGE_TO_CAPTION}, compression=True),
    "sharegpt4v": ZeroShotPrompt({"t2i": _CAPTION_TO_IMAGE, "i2t": _IMAGE_TO_CAPTION}),
    "urban1k": ZeroShotPrompt({"t2i": _CAPTION_TO_IMAGE, "i2t": _IMAGE_TO_CAPTION}),
    "circo": ZeroShotPrompt({"cir": _COMPOSED_CHANGE}),
    "genecis": ZeroShotPrompt({
        "change_object": _COMPOSED_CHANGE,
        "focus_object": _COMPOSED_CHANGE,
        "change_attribute": _COMPOSED_CHANGE,
        "focus_attribute": "I'm looking for an image with the same attributes as described.",
    }),
    "visdial": ZeroShotPrompt({"dialog2i": "Find me an everyday image that matches the given dialog."}),
    "fashioniq_multiturn": ZeroShotPrompt(
        {"multiturn": "Find me a similar fashion image based on the following multi-round modifications."}),
    "ccneg": ZeroShotPrompt({"itm": ""}),
    "sugar_crepe": ZeroShotPrompt({"itm": ""}),
    "msrvtt": ZeroShotPrompt({"t2v": _TEXT_TO_VIDEO}),
    "msvd": ZeroShotPrompt({"t2v": _TEXT_TO_VIDEO}),
}
