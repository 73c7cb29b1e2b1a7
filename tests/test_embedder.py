"""The embedder the paper's Findings 1 and 2 are about: pooling, padding, saving, merging."""
from __future__ import annotations

import pytest
import torch

from umarvel import Embedder
from umarvel.config import ConfigError


@pytest.fixture(scope="module")
def trained_like(tiny_model_dir, tmp_path_factory):
    """An embedder whose LoRA matrices are non-zero, as after training."""
    emb = Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"r": 4, "alpha": 8})
    generator = torch.Generator().manual_seed(0)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    emb.temperature.tau.data.fill_(0.03)
    return emb


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padded_mixed_batch_embeds_like_each_item_alone(tiny_model_dir, mixed_items, attention, pooling):
    emb = Embedder.from_pretrained(tiny_model_dir, attention=attention, pooling=pooling)
    batched = emb.encode(mixed_items, batch_size=len(mixed_items))
    alone = torch.cat([emb.encode([item]) for item in mixed_items])
    assert batched.shape == (len(mixed_items), 64)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(mixed_items)), atol=1e-5)
    assert (batched - alone).abs().max() < 1e-5


def test_instruction_is_attended_but_not_pooled(tiny_model_dir, mixed_items):
    emb = Embedder.from_pretrained(tiny_model_dir, mask_instruction=True)
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
            assert (emb.encode([item]) - emb.encode([other])).abs().max() > 1e-4


def test_without_masking_only_padding_is_left_out(tiny_model_dir, mixed_items):
    emb = Embedder.from_pretrained(tiny_model_dir, mask_instruction=False)
    batch = emb.collate(mixed_items)
    assert torch.equal(batch["pool_mask"], batch["attention_mask"].bool())


def test_mean_pool_equals_hand_average_of_selected_tokens(tiny_model_dir, mixed_items):
    emb = Embedder.from_pretrained(tiny_model_dir).eval()
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
    before = trained_like.encode(mixed_items)
    trained_like.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = Embedder.from_pretrained(tmp_path / "adapter")
    assert torch.equal(loaded.encode(mixed_items), before)
    assert loaded.temperature.value == pytest.approx(trained_like.temperature.value)
    assert loaded.settings.lora.r == 4


def test_merged_checkpoint_matches_unmerged(trained_like, mixed_items, tmp_path):
    before = trained_like.encode(mixed_items)
    trained_like.merge_and_save(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    merged = Embedder.from_pretrained(tmp_path / "merged")
    assert not merged.has_adapter
    assert (merged.encode(mixed_items) - before).abs().max() < 1e-5
    assert merged.temperature.value == pytest.approx(trained_like.temperature.value)
    # The merge must not have disturbed the live adapter.
    assert torch.equal(trained_like.encode(mixed_items), before)


def test_merged_checkpoint_takes_a_fresh_adapter(trained_like, tmp_path):
    trained_like.merge_and_save(tmp_path / "merged")
    fresh = Embedder.from_pretrained(tmp_path / "merged", trainable=True, lora={"r": 2})
    ranks = {p.shape[0] for n, p in fresh.backbone.named_parameters() if "lora_A" in n}
    assert ranks == {2}


def test_lora_targets_every_language_linear_and_freezes_vision(tiny_model_dir):
    emb = Embedder.from_pretrained(tiny_model_dir, trainable=True)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("temperature") for n in trainable)
    assert not any("visual" in n for n in trainable)
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


def test_qwen25_embedder_round_trip(tiny_qwen25_dir, mixed_items, tmp_path):
    emb = Embedder.from_pretrained(tiny_qwen25_dir, trainable=True)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    before = emb.encode(mixed_items, batch_size=2)
    emb.merge_and_save(tmp_path / "m")
    assert (Embedder.from_pretrained(tmp_path / "m").encode(mixed_items) - before).abs().max() < 1e-5
