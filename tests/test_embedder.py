"""The embedder the paper's Findings 1 and 2 are about: pooling, padding, saving, merging.

The property tests run on a tiny model of every backbone family (`family_model_dir`)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from umarvel import Embedder
from umarvel.cli import main
from umarvel.config import ConfigError
from umarvel.errors import UmarvelError


@pytest.fixture(scope="module")
def trained_like(family_model_dir):
    """An embedder whose LoRA matrices are non-zero, as after training."""
    emb = Embedder.from_pretrained(family_model_dir, trainable=True, lora={"r": 4, "alpha": 8})
    generator = torch.Generator().manual_seed(0)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    emb.temperature.tau.data.fill_(0.03)
    return emb


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padded_mixed_batch_embeds_like_each_item_alone(family_model_dir, mixed_items, attention, pooling):
    emb = Embedder.from_pretrained(family_model_dir, attention=attention, pooling=pooling)
    batched = emb.encode(mixed_items, batch_size=len(mixed_items), convert_to_tensor=True)
    alone = torch.cat([emb.encode([item], convert_to_tensor=True) for item in mixed_items])
    assert batched.shape == (len(mixed_items), 64)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(mixed_items)), atol=1e-5)
    assert (batched - alone).abs().max() < 1e-5


def test_instruction_is_attended_but_not_pooled(family_model_dir, mixed_items):
    emb = Embedder.from_pretrained(family_model_dir, mask_instruction=True)
    batch = emb.collate(mixed_items)
    tokenizer = emb.processor.tokenizer
    for row, item in enumerate(mixed_items):
        real = batch["attention_mask"][row].bool()
        excluded = real & ~batch["pool_mask"][row]
        assert not (batch["pool_mask"][row] & ~real).any(), "padding must never be pooled"
        dropped = tokenizer.decode(batch["input_ids"][row][excluded])
        assert dropped == (item.get("instruction") or "")
        if item.get("instruction"):
            # Masked from the pool, yet still attended: changing it changes the embedding.
            other = dict(item, instruction="Completely different words here.")
            apart = emb.encode([item], convert_to_tensor=True) - emb.encode([other], convert_to_tensor=True)
            assert apart.abs().max() > 1e-4


def test_without_masking_only_padding_is_left_out(tiny_model_dir, mixed_items):
    emb = Embedder.from_pretrained(tiny_model_dir, mask_instruction=False)
    batch = emb.collate(mixed_items)
    assert torch.equal(batch["pool_mask"], batch["attention_mask"].bool())


def test_mean_pool_equals_hand_average_of_selected_tokens(family_model_dir, mixed_items):
    emb = Embedder.from_pretrained(family_model_dir).eval()
    batch = emb.collate(mixed_items[:3])
    with torch.no_grad():
        model_inputs = {k: v for k, v in batch.items() if k != "pool_mask"}
        hidden = emb.backbone(**model_inputs, use_cache=False).last_hidden_state
        got = emb.embed_batch(batch)
    for row in range(3):
        selected = hidden[row][batch["pool_mask"][row]]
        expected = torch.nn.functional.normalize(selected.mean(0), dim=-1)
        assert (got[row] - expected).abs().max() < 1e-6


def test_last_pooling_takes_the_last_real_token(tiny_model_dir, mixed_items):
    emb = Embedder.from_pretrained(tiny_model_dir, pooling="last", attention="causal").eval()
    batch = emb.collate(mixed_items[:2])
    with torch.no_grad():
        model_inputs = {k: v for k, v in batch.items() if k != "pool_mask"}
        hidden = emb.backbone(**model_inputs, use_cache=False).last_hidden_state
        got = emb.embed_batch(batch)
    for row in range(2):
        last = int(batch["attention_mask"][row].sum()) - 1
        assert (got[row] - torch.nn.functional.normalize(hidden[row, last], dim=-1)).abs().max() < 1e-6


def test_adapter_save_load_gives_identical_embeddings(trained_like, mixed_items, tmp_path):
    before = trained_like.encode(mixed_items, convert_to_tensor=True)
    trained_like.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = Embedder.from_pretrained(tmp_path / "adapter")
    assert torch.equal(loaded.encode(mixed_items, convert_to_tensor=True), before)
    assert loaded.temperature.value == pytest.approx(trained_like.temperature.value)
    assert loaded.settings.lora.r == 4


def test_a_run_directory_loads_its_final_adapter(trained_like, mixed_items, tmp_path):
    """The README's promise: from_pretrained takes a run directory (it means run/model/)."""
    trained_like.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    loaded = Embedder.from_pretrained(tmp_path / "run")
    assert torch.equal(loaded.encode(mixed_items, convert_to_tensor=True),
                       trained_like.encode(mixed_items, convert_to_tensor=True))
    with pytest.raises(UmarvelError, match=r"empty is not a run directory.*holds embedder_config.json or config.json"):
        Embedder.from_pretrained(tmp_path / "empty")


def test_a_moved_run_tree_finds_its_backbone_relative_to_the_adapter(tiny_model_dir, mixed_items, tmp_path, capsys):
    """An adapter records its backbone relative to itself too: copy the project elsewhere and it
    still loads; without its backbone, the error names both ways to point to one."""
    shutil.copytree(tiny_model_dir, tmp_path / "project" / "checkpoints" / "tiny")
    emb = Embedder.from_pretrained(tmp_path / "project" / "checkpoints" / "tiny", trainable=True)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    before = emb.encode(mixed_items, convert_to_tensor=True)
    emb.save_pretrained(tmp_path / "project" / "runs" / "stage" / "model")
    saved = json.loads((tmp_path / "project" / "runs" / "stage" / "model" / "embedder_config.json").read_text())
    assert saved["backbone_relative"] == "../../../checkpoints/tiny"
    (tmp_path / "project").rename(tmp_path / "moved")
    moved = Embedder.from_pretrained(tmp_path / "moved" / "runs" / "stage")
    assert torch.equal(moved.encode(mixed_items, convert_to_tensor=True), before)

    (tmp_path / "moved" / "checkpoints" / "tiny").rename(tmp_path / "elsewhere")
    with pytest.raises(UmarvelError, match=r"--set model.backbone=PATH.*backbone=PATH in from_pretrained"):
        Embedder.from_pretrained(tmp_path / "moved" / "runs" / "stage")
    given = Embedder.from_pretrained(tmp_path / "moved" / "runs" / "stage", backbone=str(tmp_path / "elsewhere"))
    assert torch.equal(given.encode(mixed_items, convert_to_tensor=True), before)
    with pytest.raises(UmarvelError, match="given for the adapter .* is not a model directory"):
        Embedder.from_pretrained(tmp_path / "moved" / "runs" / "stage", backbone=str(tmp_path / "nowhere"))

    # On the command line, --set model.backbone=PATH points the evaluated adapter to it.
    argv = ["eval", "mbeir", "--model", str(tmp_path / "moved" / "runs" / "stage"), "--data", str(tmp_path / "none"),
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--set model.backbone=PATH" in capsys.readouterr().err
    assert main([*argv, "--set", f"model.backbone={tmp_path / 'elsewhere'}"]) == 2
    assert "M-BEIR directory not found" in capsys.readouterr().err  # the model loaded; the data is missing


def test_merged_checkpoint_matches_unmerged(trained_like, mixed_items, tmp_path):
    before = trained_like.encode(mixed_items, convert_to_tensor=True)
    trained_like.merge_and_save(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    merged = Embedder.from_pretrained(tmp_path / "merged")
    assert not merged.has_adapter
    assert (merged.encode(mixed_items, convert_to_tensor=True) - before).abs().max() < 1e-5
    assert merged.temperature.value == pytest.approx(trained_like.temperature.value)
    # The merge must not have disturbed the live adapter.
    assert torch.equal(trained_like.encode(mixed_items, convert_to_tensor=True), before)


def test_merged_checkpoint_takes_a_fresh_adapter(trained_like, tmp_path):
    trained_like.merge_and_save(tmp_path / "merged")
    fresh = Embedder.from_pretrained(tmp_path / "merged", trainable=True, lora={"r": 2})
    ranks = {p.shape[0] for n, p in fresh.backbone.named_parameters() if "lora_A" in n}
    assert ranks == {2}


def test_lora_targets_every_language_linear_and_freezes_vision(family_model_dir):
    emb = Embedder.from_pretrained(family_model_dir, trainable=True)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("temperature") for n in trainable)
    assert all(f".{emb.family.language_model}." in n for n in trainable if "lora_" in n)
    vision = getattr(emb.backbone.get_base_model(), emb.family.vision_tower)
    assert vision is not None and not any(p.requires_grad for p in vision.parameters())
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_target_suffixes_and_bad_suffix(tiny_model_dir):
    emb = Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"target_modules": ["q_proj", "v_proj"]})
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in emb.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="matches no linear layer"):
        Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"target_modules": ["nope"]})


def test_learnable_temperature_is_bounded_and_in_its_own_undecayed_group(tiny_model_dir):
    emb = Embedder.from_pretrained(
        tiny_model_dir, trainable=True, temperature={"init": 0.05, "learnable": True, "min": 0.01, "max": 0.1}
    )
    emb.temperature.tau.data.fill_(10.0)
    assert emb.temperature.value == pytest.approx(0.1)
    groups = emb.parameter_groups(weight_decay=0.1, temperature_lr=0.01)
    assert [len(g["params"]) for g in groups[2:]] == [1] and groups[2]["params"][0] is emb.temperature.tau
    assert groups[2] == {"params": [emb.temperature.tau], "weight_decay": 0.0, "lr": 0.01}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert "lr" not in emb.parameter_groups(weight_decay=0.1)[2]


def test_bad_override_names_the_key(tiny_model_dir):
    with pytest.raises(ConfigError, match="model.poolin: unknown key"):
        Embedder.from_pretrained(tiny_model_dir, poolin="mean")
    with pytest.raises(ConfigError, match="model.pooling: 'max' is not one of"):
        Embedder.from_pretrained(tiny_model_dir, pooling="max")



def test_the_family_record_names_every_input_its_processor_makes(family_model_dir, mixed_items, tmp_path):
    """An input the record does not list would be dropped silently before the forward."""
    from zeroshot_fixtures import video

    emb = Embedder.from_pretrained(family_model_dir)
    batch = emb.collate(mixed_items + [{"video": str(video(tmp_path / "clip.mp4"))}])
    assert set(batch) - {"pool_mask"} == set(emb.family.model_inputs)
    grid = batch["image_grid_thw"]
    patch = emb.family.patch_size
    assert batch["pixel_values"].shape == (int(grid.prod(dim=1).sum()), 3 * 2 * patch * patch)  # RGB x 2 frames
