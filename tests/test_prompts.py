"""Every prompt variant of the paper's Tables 1 and 2 is reachable, with no new vocabulary."""
from __future__ import annotations

import pytest

from conftest import draw_image
from umarvel import backbones
from umarvel.backbone import load_processor
from umarvel.config import PromptConfig
from umarvel.data.collator import Collator
from umarvel.data.prompts import render, truncate_text

FAMILY = backbones.get(backbones.DEFAULT)
CHAT = FAMILY.chat


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


ITEM = {"image": "img.png", "text": "same but red", "instruction": "Retrieve the modified image."}


def test_default_layout_is_the_qwen2vl_chat_turn():
    out = render(ITEM, PromptConfig(system_prompt="Sys."), CHAT)
    assert out.text == (
        "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Retrieve the modified image. same but red<|im_end|>"
    )
    assert out.images == ["img.png"]
    start, end = out.instruction_span
    assert out.text[start:end] == ITEM["instruction"]


@pytest.mark.parametrize(
    "item, phrase",
    [
        ({"text": "a cat"}, "Summarize above sentence in one word:"),
        ({"image": "x.png"}, "Summarize above image in one word:"),
        ({"image": "x.png", "text": "a cat"}, "Summarize above image and sentence in one word:"),
    ],
)
def test_compression_prompt_variant(item, phrase):
    out = render(item, PromptConfig(compression_prompt=True, system_prompt=""), CHAT)
    assert out.text.endswith(f"\n{phrase}<|im_end|>\n<|im_start|>assistant\n")
    assert phrase not in render(item, PromptConfig(compression_prompt=False), CHAT).text


def test_instructions_can_be_switched_off():
    out = render(ITEM, PromptConfig(use_instruction=False), CHAT)
    assert "Retrieve" not in out.text and out.instruction_span is None


def test_item_without_content_is_rejected():
    with pytest.raises(ValueError, match="neither text nor image"):
        render({"instruction": "x"}, PromptConfig(), CHAT)


def test_no_tokens_are_added_to_the_vocabulary(processor):
    before = len(processor.tokenizer)
    Collator(processor, PromptConfig(), FAMILY)([{"text": "a", "instruction": "Find it."}])
    assert len(processor.tokenizer) == before


def test_text_budget_covers_instruction_and_text_and_never_cuts_images(processor):
    config = PromptConfig(max_text_tokens=12)
    long_text = "a very long caption " * 20
    item = {"image": draw_image("red"), "text": long_text, "instruction": "Find the image."}
    collator = Collator(processor, config, FAMILY)
    batch = collator([item])
    tok = processor.tokenizer
    n_instr = len(tok("Find the image.", add_special_tokens=False)["input_ids"])
    kept = render(item, config, CHAT, tok).text.split("Find the image. ")[1].removesuffix("<|im_end|>")
    assert len(tok(kept, add_special_tokens=False)["input_ids"]) == 12 - n_instr
    image_tokens = int(batch["image_grid_thw"].prod(-1).sum()) // 4
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == image_tokens


def test_truncate_text_is_token_exact(processor):
    tok = processor.tokenizer
    text = "one two three four five six"
    assert truncate_text(text, tok, 100) == text
    cut = truncate_text(text, tok, 3)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == 3 and text.startswith(cut)
    assert truncate_text(text, tok, 0) == ""
