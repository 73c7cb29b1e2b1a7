"""Embedding profiles: `umarvel-release` embeds as the official U-MARVEL inference does, and
`umarvel` (the default) embeds exactly as before profiles existed."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import draw_image
from umarvel import profiles
from umarvel.backbone import language_model, set_attention_mode
from umarvel.cli import main
from umarvel.config import ConfigError, ModelConfig, ProfileRulesConfig
from umarvel.data.collator import PairCollator
from umarvel.modeling.embedder import Embedder
from umarvel.tiny import RELEASE_TEMPERATURE, build_tiny_model

STORED = Path(__file__).parent / "data" / "umarvel_profile_vectors.json"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
END = "<|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n<|im_start|>assistant\n"
IMAGE = "<|vision_start|>{pads}<|vision_end|>"
SENTENCE, PICTURE, BOTH = ("\nSummarize above sentence in one word: ", "\nSummarize above image in one word: ",
                           "\nSummarize above image and sentence in one word: ")


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "U-MARVEL-tiny"
    assert main(["make-tiny-model", "--out", str(out), "--layout", "umarvel-release"]) == 0
    return out


@pytest.fixture(scope="module")
def release(release_dir):
    return Embedder.from_pretrained(release_dir, profile="umarvel-release", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def official_tokenizer(release_dir):
    """The base tokenizer with the three tokens added as the official eval adds them
    (tokenizer.add_tokens, not special), tokenising a whole prompt string at once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(release_dir)
    assert tokenizer.add_tokens(list(profiles.RELEASE_TOKENS)) == 3
    return tokenizer


def _items():
    red, blue = draw_image("red"), draw_image("blue", "square")
    return {
        "text query": {"qid": "9:1", "text": "a red circle.", "instruction": "Find an image matching the caption."},
        "image query": {"qid": "9:2", "image": red, "instruction": "Find a caption for the image."},
        "image+text query": {"qid": "9:3", "image": red, "text": "make it blue.", "instruction": "Retrieve the edit."},
        "text candidate": {"did": "8:1", "text": "A blue square."},
        "image candidate": {"did": "8:2", "image": blue},
        "image+text candidate": {"did": "8:3", "image": blue, "text": "A blue square."},
    }


# The official format (chaxjli/U-MARVEL: dataset/datasets_mbeir.py, collators/mbeir_eval.py,
# apply_chat_template with add_generation_prompt=True), written out by hand.
EXPECTED = {
    "text query": SYSTEM + "<instruction_start>Find an image matching the caption.<instruction_end> a red circle."
    + SENTENCE + END,
    "image query": SYSTEM + IMAGE + "<instruction_start>Find a caption for the image.<instruction_end>." + BOTH + END,
    "image+text query": SYSTEM + IMAGE + "<instruction_start>Retrieve the edit.<instruction_end> make it blue."
    + BOTH + END,
    "text candidate": SYSTEM + "A blue square." + SENTENCE + END,
    "image candidate": SYSTEM + IMAGE + BOTH + END,
    "image+text candidate": SYSTEM + IMAGE + "A blue square." + BOTH + END,
}


def _real(batch, row):
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_release_tokens_equal_the_official_format(release, official_tokenizer, name):
    batch = release.collate([_items()[name]])
    pads = int(batch["image_grid_thw"].prod(-1).sum()) // 4 if "image_grid_thw" in batch else 0
    expected = EXPECTED[name].format(pads="<|image_pad|>" * pads)
    assert _real(batch, 0) == official_tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_release_quirks_are_a_switch(release_dir):
    plain = Embedder.from_pretrained(release_dir, profile="umarvel-release", rules={"release_quirks": False},
                                     device="cpu", dtype="float32")
    tokenizer = plain.processor.tokenizer
    text = [tokenizer.decode(_real(plain.collate([_items()[name]]), 0)) for name in ("image query", "image candidate")]
    assert "<instruction_end>" + BOTH in text[0]
    assert PICTURE in text[1]


def test_release_pool_is_every_non_pad_token_but_the_marker_span(release):
    items = list(_items().values())
    batch = release.collate(items)
    start, end = (release.processor.tokenizer.convert_tokens_to_ids(t)
                  for t in (profiles.INSTRUCTION_START, profiles.INSTRUCTION_END))
    assert bool((batch["attention_mask"] == 0).any())  # padded: the pad is left out too
    for row, ids in enumerate(batch["input_ids"].tolist()):
        expected = batch["attention_mask"][row].bool().clone()
        if start in ids:
            expected[ids.index(start) : ids.index(end) + 1] = False
        assert torch.equal(batch["pool_mask"][row], expected)
    assert sum(start in ids for ids in batch["input_ids"].tolist()) == 3


def _positions_seen(embedder, items):
    seen = {}

    def record(_module, _args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    hook = language_model(embedder.backbone).register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            embedder.embed_batch(embedder.collate(items))
    finally:
        hook.remove()
    return seen["positions"]


def test_release_positions_are_1d_on_every_axis(release, tiny_model_dir):
    items = [_items()["image+text query"], _items()["text candidate"]]
    positions = _positions_seen(release, items)
    width = positions.shape[-1]
    assert torch.equal(positions.expand(3, 2, width), torch.arange(width).expand(3, 2, width))
    umarvel = Embedder.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    mrope = _positions_seen(umarvel, items[:1])
    assert mrope.shape[0] == 3 and not torch.equal(mrope[1], mrope[2])  # image tokens: 2-D there


def test_release_attention_is_causal_only_without_padding(release):
    short, long = _items()["text candidate"], _items()["image+text query"]

    def embed(items, attention, unpadded_causal):
        saved = release.rules
        release.rules = dataclasses.replace(saved, unpadded_causal=unpadded_causal)
        set_attention_mode(release.backbone, attention)
        try:
            with torch.no_grad():
                return release.embed_batch(release.collate(items))[0]
        finally:
            release.rules = saved
            set_attention_mode(release.backbone, "bidirectional")

    alone = embed([short], "bidirectional", True)
    assert torch.allclose(alone, embed([short], "causal", False), atol=1e-6)
    assert not torch.allclose(alone, embed([short], "bidirectional", False), atol=1e-4)
    padded = embed([short, long], "bidirectional", True)
    assert torch.allclose(padded, embed([short, long], "bidirectional", False), atol=1e-6)
    assert not torch.allclose(padded, embed([short, long], "causal", False), atol=1e-4)


def test_release_cuts_candidates_never_queries(release_dir):
    embedder = Embedder.from_pretrained(release_dir, profile="umarvel-release", rules={"candidate_max_tokens": 30},
                                        device="cpu", dtype="float32")
    long_text = "a very long caption about shapes " * 20
    batch = embedder.collate([{"did": "1:1", "text": long_text}, {"qid": "1:1", "text": long_text, "instruction": "Find."}])
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] == 30 and lengths[1] > 100


def test_release_reads_images_as_the_official_inference(release, release_dir, tmp_path):
    """Its copy of qwen-vl-utils (collators/qwen2_vision_process.py): PIL's convert("RGB") and a
    side rounded past 200x the other cut to 200x it; umarvel composites on white and refuses."""
    from PIL import Image

    from umarvel import backbones
    from umarvel.config import PromptConfig
    from umarvel.data.collator import load_image
    from umarvel.errors import DataError

    family, prompt = backbones.get("qwen2-vl"), PromptConfig()
    Image.new("RGB", (7900, 40), "grey").save(tmp_path / "banner.png")  # 197.5:1, rounded to 7896x28 (282:1)
    assert load_image(tmp_path / "banner.png", prompt, family, official=True).size == (5600, 28)
    with pytest.raises(DataError, match="banner.png.*aspect ratio of 282"):
        load_image(tmp_path / "banner.png", prompt, family)
    hidden_red = Image.new("RGBA", (56, 56), (255, 0, 0, 0))  # fully transparent red
    hidden_red.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", prompt, family, official=True).getpixel((28, 28)) == (255, 0, 0)
    assert load_image(tmp_path / "clear.png", prompt, family).getpixel((28, 28)) == (255, 255, 255)

    palette = Image.new("P", (56, 56), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.paste(1, (0, 0, 28, 56))
    palette.save(tmp_path / "palette.png", transparency=0)  # red, the left half blue, red transparent
    read = load_image(tmp_path / "palette.png", prompt, family, official=True)
    Image.fromarray(np.asarray(read)).save(tmp_path / "plain.png")  # the same pixels, no transparency
    assert read.getpixel((40, 28)) == (255, 0, 0)
    pixels = [release.collate([{"did": "1:1", "image": str(tmp_path / name)}])["pixel_values"]
              for name in ("palette.png", "plain.png")]
    assert torch.equal(*pixels)  # the processor does not turn the transparent colour white either

    item = {"did": "1:1", "image": str(tmp_path / "banner.png")}
    assert release.collate([item])["image_grid_thw"].tolist() == [[1, 2, 400]]  # the rule reaches the collator
    umarvel_images = Embedder.from_pretrained(release_dir, profile="umarvel-release", rules={"images": "umarvel"},
                                              device="cpu", dtype="float32")
    with pytest.raises(DataError, match="banner.png"):
        umarvel_images.collate([item])


def test_marker_rows_are_deterministic_and_emb_keeps_the_checkpoint_row(release, release_dir, tmp_path):
    from safetensors.torch import load_file

    tokenizer = release.processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in profiles.RELEASE_TOKENS]
    weight = release.backbone.get_input_embeddings().weight
    stored = load_file(release_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert weight.shape == stored.shape and max(ids) < len(stored)  # the padded vocabulary holds them: no resize
    assert torch.equal(weight[ids[0]], stored[ids[0]])
    again = Embedder.from_pretrained(release_dir, profile="umarvel-release", device="cpu", dtype="float32")
    assert torch.equal(again.backbone.get_input_embeddings().weight[ids[1:]], weight[ids[1:]])
    assert not torch.equal(weight[ids[1:]], stored[ids[1:]])
    assert 0.01 < float(weight[ids[1:]].std()) < 0.03
    rows = np.full((2, weight.shape[1]), 0.5, dtype=np.float32)
    np.save(tmp_path / "rows.npy", rows)
    given = Embedder.from_pretrained(release_dir, profile="umarvel-release", rules={"marker_rows": str(tmp_path / "rows.npy")},
                                     device="cpu", dtype="float32")
    assert torch.equal(given.backbone.get_input_embeddings().weight[ids[1:]], torch.from_numpy(rows))


def test_released_layout_loads_quietly_with_its_temperature(release_dir, caplog):
    config = json.loads((release_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLRetFinetuneForConditionalGeneration"] and "text_config" not in config
    assert config["vocab_size"] % 128 == 0
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        embedder = Embedder.from_pretrained(release_dir, profile="umarvel-release", device="cpu", dtype="float32")
    assert [str(w.message) for w in caught] == [] and caplog.records == []
    assert embedder.temperature.value == pytest.approx(RELEASE_TEMPERATURE)


def test_cli_eval_and_mining_run_on_the_released_layout(release_dir, synthetic_dir, tmp_path):
    stdout, stderr = io.StringIO(), io.StringIO()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["eval", "mbeir", "--pool", "both", "--profile", "umarvel-release", "--model", str(release_dir),
                     "--data", str(synthetic_dir), "--output-dir", str(tmp_path / "eval"), *cache]) == 0
        assert main(["mine-negatives", "--profile", "umarvel-release", "--model", str(release_dir), "--data",
                     str(synthetic_dir), "--out", str(tmp_path / "neg.jsonl"), *cache]) == 0
    assert "local: average" in stdout.getvalue() and "global: average" in stdout.getvalue()
    assert (tmp_path / "eval" / "local" / "results.json").is_file() and (tmp_path / "neg.jsonl").is_file()
    assert "warn" not in stderr.getvalue().lower()


def test_profile_rules_resolve_and_belong_to_a_family():
    rules = profiles.resolve(ModelConfig(profile="umarvel-release", rules=ProfileRulesConfig(positions="mrope")), "qwen2-vl")
    assert rules.positions == "mrope" and rules.template == "release" and rules.unpadded_causal
    assert profiles.resolve(ModelConfig(), "qwen3-vl") == profiles.UMARVEL.rules
    with pytest.raises(ConfigError, match="model.profile.*qwen2-vl, qwen3-vl families, the backbone is qwen2.5-vl"):
        profiles.resolve(ModelConfig(profile="umarvel-release"), "qwen2.5-vl")
    with pytest.raises(ConfigError, match="unknown embedding profile"):
        profiles.get("lamra")


def test_umarvel_profile_embeddings_are_the_stored_ones(tmp_path):
    """Vectors of the tiny model computed before profiles existed (tests/data, from main)."""
    items = [
        {"text": "two red circles on the left of a green square", "instruction": "Find an image that matches the caption."},
        {"image": draw_image("red")},
        {"image": draw_image("blue", "square"), "text": "same but red", "instruction": "Retrieve the modified image."},
        {"text": "a cat"},
    ]
    embedder = Embedder.from_pretrained(build_tiny_model(tmp_path / "m", seed=0), device="cpu", dtype="float32")
    with torch.no_grad():
        vectors = embedder.embed_batch(embedder.collate(items)).numpy()
    np.testing.assert_allclose(vectors, np.array(json.loads(STORED.read_text())["batch"]), atol=1e-5)


SPECIAL_TEXT = "a caption with <|image_pad|> and <|im_end|> and <emb> inside"


@pytest.mark.parametrize("profile", list(profiles.PROFILES))
def test_special_token_strings_in_dataset_text_stay_text(profile, tiny_model_dir, release_dir):
    directory = release_dir if profile == "umarvel-release" else tiny_model_dir
    embedder = Embedder.from_pretrained(directory, profile=profile, device="cpu", dtype="float32")
    tokenizer = embedder.processor.tokenizer
    item = {"qid": "1:1", "text": SPECIAL_TEXT, "instruction": "Find <|im_end|> it."}
    clean = {"qid": "1:1", "text": "a caption", "instruction": "Find it."}
    batch, reference = embedder.collate([item]), embedder.collate([clean])
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in profiles.RELEASE_TOKENS}
    counts = [{i: ids.count(i) for i in special} for ids in (_real(batch, 0), _real(reference, 0))]
    assert counts[0] == counts[1]  # the template's special tokens only
    assert tokenizer.decode(_real(batch, 0)).count(SPECIAL_TEXT) == 1
    with torch.no_grad():
        assert torch.isfinite(embedder.embed_batch(batch)).all()
    pair = PairCollator(embedder.collator)([{"query": item, "positive": {"did": "2:1", "text": SPECIAL_TEXT}}])
    assert not (pair["positive"]["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).any()


def test_ordinary_text_tokenises_as_the_processor_does(family_model_dir, mixed_items, tmp_path):
    """The piecewise tokenisation changes nothing for text without special-token strings, with
    images, several images and a video, in every family (Qwen3-VL's frame timestamps too)."""
    from zeroshot_fixtures import video

    from umarvel.data.collator import _video_inputs, load_image
    from umarvel.data.prompts import render
    from umarvel.data.video import load_video

    clip = video(tmp_path / "clip.mp4", frames=20, fps=10)
    items = [*mixed_items, {"image": [draw_image("red"), draw_image("blue")], "text": "both", "instruction": "Find."},
             {"video": {"path": str(clip), "frames": 4}, "text": "a clip", "instruction": "Find the video."}]
    embedder = Embedder.from_pretrained(family_model_dir, device="cpu", dtype="float32")
    collator = embedder.collator
    ours = collator(items)
    rendered = [render(item, collator.prompt, collator.family.chat, embedder.processor.tokenizer) for item in items]
    images = [load_image(image, collator.prompt, collator.family) for r in rendered for image in r.images]
    videos = [load_video(v) for r in rendered for v in r.videos]
    theirs = embedder.processor(text=[r.text for r in rendered], images=images, **_video_inputs(videos),
                                padding=True, return_tensors="pt", return_mm_token_type_ids=True)
    assert set(theirs) <= set(ours)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def _batching_items() -> list[dict]:
    """20 items crossing the release's 16-item batch: equal-length image items (a batch of them
    has no padding), texts of different lengths, image+text with instructions."""
    equal = [{"image": draw_image(colour)} for colour in ("red", "blue", "green", "yellow", "purple", "orange")]
    texts = [{"text": "a cat " * n} for n in range(1, 8)]
    pairs = [{"image": draw_image(colour, "square"), "text": f"the {colour} one, {'much ' * n}bigger",
              "instruction": "Retrieve the modified image."} for n, colour in enumerate(("red", "blue", "green"))]
    return [*equal, *texts, *pairs, *equal[:4]]


@pytest.mark.parametrize("workers", [0, 2])
def test_release_vectors_do_not_depend_on_batch_settings(release, workers):
    """umarvel-release forms its batches as the official evaluation (16 in file order), so the
    caller's batch size and the worker pipeline change no vector, exactly; and its vectors are
    those of encoding each 16-item slice of the file on its own."""
    items = _batching_items()
    by_file = np.concatenate([release.encode(items[:16]), release.encode(items[16:])])
    for batch_size in (1, 3, 16, 32):
        np.testing.assert_array_equal(release.encode(items, batch_size=batch_size, num_workers=workers), by_file)


@pytest.mark.parametrize("workers", [0, 2])
def test_default_vectors_do_not_depend_on_batch_settings(tiny_model_dir, workers):
    """The default profile is bidirectional with padding masked: batching moves no vector beyond
    float rounding."""
    embedder = Embedder.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    items = _batching_items()
    alone = embedder.encode(items, batch_size=1)
    for batch_size in (3, 16, 32):
        np.testing.assert_allclose(embedder.encode(items, batch_size=batch_size, num_workers=workers), alone,
                                   atol=1e-5, rtol=0)


OFFICIAL_TEXTS = [  # (the file's string, the official format_string's, ours)
    ("two lines\nof text", "Two lines\nof text.", "Two lines of text."),
    ("carriage\r\nreturn\r", "Carriage\nreturn.", "Carriage  return."),
    ('"a quoted caption"', "A quoted caption.", '"a quoted caption".'),
    ('  " spaces inside the quotes "  ', " spaces inside the quotes .", '" spaces inside the quotes ".'),
    ("   leading spaces", "Leading spaces.", "Leading spaces."),
    ("is it red?", "Is it red?", "Is it red?"),
]


@pytest.mark.parametrize(("raw", "official", "ours"), OFFICIAL_TEXTS)
def test_text_normalisation_official_under_release_ours_by_default(raw, official, ours):
    from umarvel.data.mbeir import format_text, official_format

    assert official_format(raw) == official
    assert format_text(raw) == ours


def test_query_text_keeps_the_official_strings_leading_spaces_and_quotes():
    """The official evaluation formats `instruction + " " + text` as one string: the text part
    keeps its leading spaces (after the joining one) and a leading quote, loses a trailing quote and
    carriage returns, and ends the sentence; ours splits the two and strips each."""
    from umarvel.data.mbeir import official_query_text, split_query_text

    instruction = "retrieve an image that matches the caption"
    assert official_query_text(instruction, '  "a red\r\ncircle"') == \
        ("Retrieve an image that matches the caption.", '   "a red\ncircle.')
    assert split_query_text(instruction, '  "a red\r\ncircle"') == \
        ("Retrieve an image that matches the caption", '"a red  circle".')


def test_text_format_rule_changes_the_release_vectors_of_such_texts(release_dir):
    """model.rules.text_format is the switch: `umarvel` under the release profile embeds these
    texts as the default profile formats them, and differently from `release`."""
    items = [{"text": raw} for raw, _, _ in OFFICIAL_TEXTS[:4]]
    official = Embedder.from_pretrained(release_dir, profile="umarvel-release", device="cpu", dtype="float32")
    ours = Embedder.from_pretrained(release_dir, profile="umarvel-release", device="cpu", dtype="float32",
                                    rules={"text_format": "umarvel"})
    assert official.rules.text_format == "release" and ours.rules.text_format == "umarvel"
    assert np.abs(official.encode(items) - ours.encode(items)).max(axis=1).min() > 1e-4
