"""U-MARVEL-Qwen3VL-4B-Instruct's layout and rules: a tiny checkpoint laid out as the release
loads as it is and embeds as the official Qwen3-VL evaluation does (no system turn,
bidirectional in every batch, no DeepStack features, images resized at 28 px first)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from conftest import draw_image
from umarvel import profiles
from umarvel.backbone import language_model
from umarvel.cli import main
from umarvel.modeling.embedder import Embedder
from umarvel.tiny import RELEASE_TEMPERATURE


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("release-qwen3") / "U-MARVEL-Qwen3VL-tiny"
    assert main(["make-tiny-model", "--out", str(out), "--family", "qwen3-vl", "--layout", "umarvel-release"]) == 0
    return out


@pytest.fixture(scope="module")
def release(release_dir):
    return Embedder.from_pretrained(release_dir, profile="umarvel-release", device="cpu", dtype="float32")


def _items():
    tall = draw_image("red", size=64).resize((40, 150))
    return [{"qid": "9:1", "text": "a red circle.", "instruction": "Find an image matching the caption."},
            {"image": tall, "text": "a tall red thing"},
            {"text": "a much longer candidate text that pads the others in its batch " * 3}]


def test_released_layout_loads_as_it_is(release_dir, release):
    config = json.loads((release_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLRetFinetuneForConditionalGeneration"]
    assert config["transformers_version"] == "4.57.0" and "rope_parameters" not in config["text_config"]
    assert config["text_config"]["rope_scaling"]["mrope_interleaved"] is True
    assert release.family.name == "qwen3-vl" and release.temperature.value == pytest.approx(RELEASE_TEMPERATURE)
    assert release.rules == profiles.UMARVEL_RELEASE.variants["qwen3-vl"]


def test_rules_render_without_system_turn_and_resize_at_28px_first(release):
    tokenizer = release.processor.tokenizer
    batch = release.collate(_items()[:2])
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<instruction_start>Find an image")
    # 40x150 -> qwen-vl-utils at 28 px (28x140, 5 tokens of 28) -> the processor at 32 px: 32x128
    assert batch["image_grid_thw"].tolist() == [[1, 8, 2]]
    family_resize = Embedder.from_pretrained(release.settings.backbone, profile="umarvel-release",
                                             rules={"image_resize": "family", "system_turn": True},
                                             device="cpu", dtype="float32")
    other = family_resize.collate(_items()[:2])
    assert other["image_grid_thw"].tolist() == [[1, 10, 2]]  # 40x150 at 32 px: 32x160
    assert tokenizer.decode(other["input_ids"][0]).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_processor_resizes_within_its_saved_pixel_bounds(release_dir, release):
    """The official Qwen3-VL evaluation never touches the processor's pixel bounds (the tiny
    checkpoint saves 4096-16384); umarvel's rule puts prompt.min_pixels/max_pixels there."""
    item = [{"image": draw_image("red", size=64).resize((150, 300)), "text": "a tall red thing"}]
    assert release.processor.image_processor.size == {"shortest_edge": 4096, "longest_edge": 16384}
    # 150x300 -> qwen-vl-utils at 28 px: 140x308 (43120 px) -> the processor at 32 px within 16384 px: 64x160
    assert release.collate(item)["image_grid_thw"].tolist() == [[1, 10, 4]]
    prompt_bounds = Embedder.from_pretrained(release_dir, profile="umarvel-release",
                                             rules={"processor_pixels": "prompt"}, device="cpu", dtype="float32")
    assert prompt_bounds.processor.image_processor.size["longest_edge"] == prompt_bounds.family.max_pixels
    assert prompt_bounds.collate(item)["image_grid_thw"].tolist() == [[1, 20, 8]]  # 128x320, within 300x32x32


def test_marker_rows_sit_at_the_mean_of_the_rows_before_them(release):
    """The official load (transformers 4.57) adds <instruction_start>, then <instruction_end>,
    each row drawn around the mean of the rows before it with their covariance scaled by 1e-9."""
    tokenizer = release.processor.tokenizer
    weight = release.backbone.get_input_embeddings().weight.detach()
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in (profiles.INSTRUCTION_START, profiles.INSTRUCTION_END))
    assert end == start + 1 and start > tokenizer.convert_tokens_to_ids(profiles.EMB_TOKEN)
    mean = weight[:start].mean(0)
    assert torch.allclose(weight[start], mean, atol=1e-7) and torch.allclose(weight[end], mean, atol=1e-7)
    assert weight[:start].std(0).min() > 1e-3  # the mean is not any of the rows' own values


def test_deepstack_features_are_left_out(release, monkeypatch):
    decoder = language_model(release.backbone)
    calls = []
    added = decoder._deepstack_process
    monkeypatch.setattr(decoder, "_deepstack_process", lambda *args: calls.append(1) or added(*args))
    batch = release.collate(_items()[1:2])
    try:
        with torch.no_grad():
            without = release.embed_batch(batch)
            assert calls == []
            release.rules = profiles.dataclasses.replace(release.rules, deepstack=True)
            with_deepstack = release.embed_batch(batch)
    finally:
        release.rules = profiles.UMARVEL_RELEASE.variants["qwen3-vl"]
    assert len(calls) == 2  # one feature per tiny decoder layer
    assert (without - with_deepstack).abs().max() > 1e-4


def test_attention_is_bidirectional_with_or_without_padding(release):
    """Unlike the Qwen2-VL release, a batch without padding is no different: an item's vector
    is the same alone as in a padded batch."""
    items = _items()
    together = release.encode(items, batch_size=3, convert_to_tensor=True)
    alone = torch.cat([release.encode([item], batch_size=1, convert_to_tensor=True) for item in items])
    assert (together - alone).abs().max() < 1e-5


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
