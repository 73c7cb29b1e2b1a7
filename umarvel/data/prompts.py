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

The rendered item records the character spans of the user's text (item text, instruction):
the collator tokenises those as plain text, so a caption containing "<|im_end|>" or
"<|image_pad|>" stays words, and finds the instruction's tokens by its span without adding
tokens to the vocabulary. Training, mining, distillation and evaluation all render through
`render`, so they can never disagree on the prompt (a known defect of the reference code).

The `umarvel-release` profile (umarvel/profiles.py) renders the official U-MARVEL inference's
layout instead (`_render_release`).
The reranker's (query, candidate) pairs have their own layout, `render_pair`, below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from umarvel import profiles
from umarvel.backbones import Chat
from umarvel.config import PromptConfig
from umarvel.data.mbeir import official_format, official_query_text

COMPRESSION = {
    "image": "Summarize above image in one word:",
    "text": "Summarize above sentence in one word:",
    "image,text": "Summarize above image and sentence in one word:",
    "video": "Summarize above video in one word:",
    "video,text": "Summarize above video and sentence in one word:",
}
# The official inference's suffixes end in a space.
RELEASE_SUFFIX = {kind: f"\n{phrase} " for kind, phrase in COMPRESSION.items()}


@dataclass
class RenderedItem:
    """Model text for one item, its images, and where the user's text sits in it.

    `user_spans` are (start, end) character ranges of `text` holding user text (never parsed
    as special tokens); `instruction_span` is the range left out of the pool with
    model.mask_instruction (the instruction, or under the release template the marker span
    around it), None when the item carries no instruction.
    """

    text: str
    images: list[Any] = field(default_factory=list)
    instruction_span: tuple[int, int] | None = None
    user_spans: list[tuple[int, int]] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)


class _Builder:
    """Concatenates template and user pieces, recording the user pieces' spans."""

    def __init__(self):
        self.text = ""
        self.user_spans: list[tuple[int, int]] = []

    def template(self, piece: str) -> tuple[int, int]:
        start = len(self.text)
        self.text += piece
        return start, len(self.text)

    def user(self, piece: str) -> tuple[int, int]:
        span = self.template(piece)
        if piece:
            self.user_spans.append(span)
        return span


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
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens - 1][1]]


def _count_tokens(text: str, tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _instruction_and_text(item: dict, config: PromptConfig, tokenizer, cut: bool = True,
                          official: tuple[str, str] | None = None) -> tuple[str, str]:
    """The item's instruction (if used) and its text, cut (when `cut`) so both fit `config.max_text_tokens`.

    `official`: normalise as the official evaluation does (model.rules.text_format=release), the
    instruction between these (start, end) markers; the text then holds what follows the marked
    instruction in the official query string (its leading space included when both are there).
    """
    if official is not None:
        instruction, text = _official_texts(item, config.use_instruction, official)
    else:
        instruction = (item.get("instruction") or "").strip() if config.use_instruction else ""
        text = (item.get("text") or "").strip()
    if tokenizer is not None and text and cut:
        budget = config.max_text_tokens - (_count_tokens(instruction, tokenizer) if instruction else 0)
        text = truncate_text(text, tokenizer, budget)
    return instruction, text


def _official_texts(item: dict, use_instruction: bool, markers: tuple[str, str]) -> tuple[str, str]:
    """(instruction, text) by the official format_string, from the file's strings when the reader
    kept them (`raw_*`, M-BEIR), else from the item's."""
    text = item.get("raw_text", item.get("text"))
    instruction = item.get("raw_instruction", item.get("instruction")) if use_instruction else None
    if not instruction:
        return "", official_format(text)
    return official_query_text(instruction, text, *markers)


def _system(config: PromptConfig, chat: Chat) -> str:
    return chat.system.format(system=config.system_prompt) if config.system_prompt else ""


def is_query(item: dict) -> bool:
    """Queries carry a qid or an instruction; everything else is a candidate."""
    return item.get("qid") is not None or bool(item.get("instruction"))


def render(item: dict, config: PromptConfig, chat: Chat, tokenizer=None, rules: profiles.Rules | None = None) -> RenderedItem:
    """Lay out `item` as `chat` text under the profile `rules` (default: umarvel's); with a
    tokenizer and truncation=text, keep instruction + text within budget."""
    rules = rules or profiles.UMARVEL.rules
    kind = modality(item)
    official = None
    if rules.text_format == "release":
        official = (profiles.INSTRUCTION_START, profiles.INSTRUCTION_END) if rules.release_template else ("", "")
    instruction, text = _instruction_and_text(item, config, tokenizer, cut=rules.truncation == "text", official=official)
    if rules.release_template:
        return _render_release(item, instruction, text, chat, rules)

    out = _Builder()
    out.template(_system(config, chat) + chat.user)
    images, videos = _visuals(item, chat, out)
    span = out.user(instruction) if instruction else None
    if official is not None and instruction:
        text = text.removeprefix(" ")  # the official string's joining space, written below
    if instruction and text:
        out.template(" ")
    out.user(text)
    suffix = ""
    if config.compression_prompt:
        suffix = f"\n{COMPRESSION[kind]}"
    suffix += chat.end
    if config.compression_prompt:
        suffix += chat.assistant
    out.template(suffix)
    return RenderedItem(text=out.text, images=images, instruction_span=span, user_spans=out.user_spans, videos=videos)


def _visuals(item: dict, chat: Chat, out: _Builder) -> tuple[list, list]:
    """Write the item's image placeholders, then its video's; return (images, videos)."""
    images = item_images(item)
    videos = [item["video"]] if item.get("video") is not None else []
    out.template(chat.image * len(images) + chat.video * len(videos))
    return images, videos


def _render_release(item: dict, instruction: str, text: str, chat: Chat, rules: profiles.Rules) -> RenderedItem:
    """The official U-MARVEL inference's layout (confirmed in chaxjli/U-MARVEL's eval datasets
    and collators): system turn (`rules.system_turn`: the base chat template's default, which
    Qwen3-VL's lacks), user turn [image]<instruction_start>{instruction}
    <instruction_end> {text} + suffix, assistant turn "<emb>.", generation prompt.

    Quirks kept with `rules.release_quirks`: an image-only query's text is its marked
    instruction plus the period its sentence formatter adds ("<instruction_end>."), and an
    image-only candidate keeps an empty text, so it gets the "image and sentence" suffix.
    """
    out = _Builder()
    system = chat.system.format(system=profiles.RELEASE_SYSTEM_PROMPT) if rules.system_turn else ""
    out.template(system + chat.user)
    images, videos = _visuals(item, chat, out)
    span = None
    query = is_query(item)
    if instruction and query:
        start = out.template(profiles.INSTRUCTION_START)[0]
        out.user(instruction)
        span = (start, out.template(profiles.INSTRUCTION_END)[1])
        if text and rules.text_format != "release":  # under the official format the text holds its space
            out.template(" ")
        elif not text and rules.release_quirks:
            out.template(".")
    out.user(text)
    has_text = bool(text) or span is not None
    visual = "video" if videos else "image" if images else ""
    if visual and (has_text or (rules.release_quirks and not query)):
        kind = f"{visual},text"
    else:
        kind = visual or "text"
    out.template(RELEASE_SUFFIX[kind] + chat.end + chat.assistant + profiles.EMB_TOKEN + "." + chat.end + chat.assistant)
    return RenderedItem(text=out.text, images=images, instruction_span=span, user_spans=out.user_spans,
                        videos=videos)


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
    images = []
    out = _Builder()
    out.template(_system(config, chat) + chat.user)
    for label, item in (("Query", query), ("Candidate", candidate)):
        modality(item)  # an item with neither text nor image is an error, not an empty side
        instruction, text = _instruction_and_text(item, config, tokenizer)
        out.template(f"\n{label}: " if label == "Candidate" else f"{label}: ")
        if item.get("image") is not None:
            out.template(chat.image)
            images.append(item["image"])
        out.user(instruction)
        if instruction and text:
            out.template(" ")
        out.user(text)
    out.template(f"\n{RERANK_QUESTION}{chat.end}{chat.assistant}")
    return RenderedItem(text=out.text, images=images, user_spans=out.user_spans)


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
