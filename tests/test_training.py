"""Contrastive training of the real embedder: batch layout, GradCache on image batches, the
Trainer end to end through the CLI, and resume equality."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import draw_image
from umarvel import Embedder
from umarvel.cli import main
from umarvel.config import load_config
from umarvel.data.collator import PairCollator, id_tensor
from umarvel.errors import DataError
from umarvel.training.gradcache import embed_and_compute_loss
from umarvel.training.losses import CandidateIds, info_nce

ROOT = Path(__file__).resolve().parents[1]


def example(i: int, negatives: int = 1, with_image: bool = True) -> dict:
    colour = ["red", "green", "blue", "orange"][i % 4]
    return {
        "query": {"qid": f"9:{i}", "text": f"a {colour} circle number {i}", "instruction": "Find the image.",
                  "pos_cand_list": [f"9:{i}", f"9:{100 + i}"]},
        "positive": {"did": f"9:{i}", "image": draw_image(colour) if with_image else None, "text": None if with_image else colour},
        "negatives": [{"did": f"9:{200 + i * 10 + k}", "text": f"not {colour} {k}"} for k in range(negatives)],
    }


def _trained_like(model_dir) -> Embedder:
    torch.manual_seed(0)  # LoRA init and weights independent of what earlier tests drew from the global RNG
    emb = Embedder.from_pretrained(model_dir, trainable=True, lora={"dropout": 0.0}, temperature={"learnable": True})
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return emb


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return _trained_like(tiny_model_dir)


@pytest.fixture(scope="module")
def family_embedder(family_model_dir):
    """The same, on every backbone family in turn."""
    return _trained_like(family_model_dir)


def test_pair_collator_keeps_negatives_query_major_with_ids(embedder):
    batch = PairCollator(embedder.collator, num_negatives=2)([example(0, 3), example(1, 2)])
    assert batch["negative"]["input_ids"].shape[0] == 4
    ids = batch["ids"]
    assert torch.equal(ids["negatives"], id_tensor(["9:200", "9:201", "9:210", "9:211"]).view(2, 2))
    assert torch.equal(ids["positive"], id_tensor(["9:0", "9:1"]))
    assert torch.equal(ids["query_positives"][1], id_tensor(["9:1", "9:101"]))
    with pytest.raises(DataError, match="query 9:2 has 1 negatives"):
        PairCollator(embedder.collator, num_negatives=2)([example(0, 2), example(2, 1)])


def test_split_batch_embeds_like_the_whole_batch(family_embedder):
    embedder = family_embedder
    items = [example(i)["positive"] for i in range(3)] + [example(i, with_image=False)["positive"] for i in range(2)]
    items.insert(1, {"text": "a long caption " * 6, "image": draw_image("blue", size=120)})
    batch = embedder.collate(items)
    split_batch, start = embedder.family.split_batch, embedder.family.vision_start_id(embedder.processor.tokenizer)
    embedder.eval()
    with torch.no_grad():
        whole = embedder.embed_batch(batch)
        for size in (1, 2, 4):
            parts = split_batch(batch, size, start)
            assert sum(p["input_ids"].shape[0] for p in parts) == len(items)
            assert (torch.cat([embedder.embed_batch(p) for p in parts]) - whole).abs().max() < 1e-5
    embedder.train()


def _gradients(embedder, batch, chunk_size, chunk_tokens=None, split_sizes=None):
    embedder.zero_grad(set_to_none=True)
    split_batch, start = embedder.family.split_batch, embedder.family.vision_start_id(embedder.processor.tokenizer)
    ids = CandidateIds(**batch["ids"])
    torch.manual_seed(7)
    out = embed_and_compute_loss(
        embedder.embed_batch,
        {k: batch[k] for k in ("query", "positive", "negative")},
        lambda e, t: info_nce(e["query"], e["positive"], t, negatives=e["negative"], negatives_scope="global",
                              bidirectional=True, ids=ids),
        embedder.temperature(),
        chunk_size=chunk_size,
        chunk_tokens=chunk_tokens,
        parameters=[p for p in embedder.parameters() if p.requires_grad],
        split=lambda b, n: (split_sizes.append(n) if split_sizes is not None else None) or split_batch(b, n, start),
    )
    out.loss.backward()
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad and p.grad is not None}


def test_gradcache_on_image_batches_matches_plain_gradients(family_embedder):
    embedder = family_embedder
    batch = PairCollator(embedder.collator, num_negatives=1)([example(i) for i in range(5)])
    embedder.train()
    plain = _gradients(embedder, batch, chunk_size=0)
    cached = _gradients(embedder, batch, chunk_size=2)
    assert plain.keys() == cached.keys() and "temperature.tau" in plain
    scale = max(g.abs().max().item() for g in plain.values())
    worst = max((plain[n] - cached[n]).abs().max().item() for n in plain)
    assert scale > 1e-3 and worst / scale < 1e-6, (worst, scale)


def test_gradcache_token_chunks_on_image_batches_match_plain_gradients(embedder):
    """Chunks by tokens: large-image items (long sequences) go alone, short texts share a chunk,
    no chunk runs over the budget unless one item does, and the gradients are the plain step's."""
    examples = [example(i, 2) for i in range(4)]
    for item in examples:
        item["positive"]["image"] = draw_image("red", size=224)  # 87 tokens, the texts ~40
    batch = PairCollator(embedder.collator, num_negatives=2)(examples)
    budget = 3 * int(batch["query"]["attention_mask"].sum(dim=1).max())
    embedder.train()
    plain = _gradients(embedder, batch, chunk_size=0)
    sizes = []
    by_tokens = _gradients(embedder, batch, chunk_size=0, chunk_tokens=budget, split_sizes=sizes)
    for name, counts in zip(("query", "positive", "negative"), sizes):
        lengths = batch[name]["attention_mask"].sum(dim=1).tolist()
        start = 0
        for count in counts:
            assert count == 1 or count * max(lengths[start : start + count]) <= budget, (name, counts, lengths)
            start += count
        assert start == len(lengths)
    assert sizes[0] == [3, 1] and sizes[1] == [1, 1, 1, 1] and max(sizes[2]) > 2, sizes
    scale = max(g.abs().max().item() for g in plain.values())
    worst = max((plain[n] - by_tokens[n]).abs().max().item() for n in plain)
    assert scale > 1e-3 and worst / scale < 1e-6, (worst, scale)


def _losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run_dir / "log_history.json").read_text()) if "loss" in e]


@pytest.mark.slow
def test_tiny_recipe_progressive_then_mine_then_hardneg_through_the_cli(tiny_workdir):
    config = str(ROOT / "configs" / "tiny" / "progressive.yaml")
    overrides = ["--set", "train.per_device_batch_size=8", "--set", "stages.mbeir.train.epochs=1"]
    assert main(["train", "--stage", "progressive", "--config", config, *overrides]) == 0
    base = tiny_workdir / "runs" / "tiny" / "progressive"
    for name in ("nli", "cc3m", "mbeir"):
        run = base / name
        assert (run / "DONE").is_file() and (run / "config.yaml").is_file()
        assert (run / "model" / "adapter_model.safetensors").is_file() and (run / "merged" / "model.safetensors").is_file()
        losses = _losses(run)
        k = max(1, len(losses) // 3)
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k, f"{name}: loss did not fall: {losses}"
    assert load_config(base / "cc3m" / "config.yaml").model.backbone == "runs/tiny/progressive/nli/merged"
    assert load_config(base / "cc3m" / "config.yaml").train.loss.bidirectional
    metrics = json.loads((base / "mbeir" / "metrics.json").read_text())
    assert metrics["temperature"] != pytest.approx(0.05)
    # A re-run skips finished sub-stages; a later sub-stage alone needs its predecessor.
    stamp = (base / "nli" / "DONE").read_text()
    assert main(["train", "--stage", "progressive", "--config", config, *overrides]) == 0
    assert (base / "nli" / "DONE").read_text() == stamp
    # ... but a finished sub-stage is never silently reused for another config
    assert main(["train", "--stage", "nli", "--config", config, *overrides, "--set", "stages.nli.train.learning_rate=1e-3"]) == 2
    assert main(["train", "--stage", "mbeir", "--config", config, "--set", "run.output_dir=runs/other"]) == 2

    # Stage 2: mine with the stage-1 model, then continue training with the mined negatives.
    mined = "runs/tiny/hardneg.jsonl"
    assert main(["mine-negatives", "--model", str(base / "mbeir"), "--data", "data/synthetic/M-BEIR", "--out", mined,
                 "--config", str(ROOT / "configs" / "tiny" / "mine.yaml"), "--set", "encode.cache_dir=cache"]) == 0
    assert main(["train", "--stage", "hardneg", "--config", str(ROOT / "configs" / "tiny" / "hardneg.yaml"),
                 "--set", "train.max_steps=2", "--set", "train.per_device_batch_size=8"]) == 0
    hardneg = tiny_workdir / "runs" / "tiny" / "hardneg"
    assert (hardneg / "DONE").is_file()
    assert load_config(hardneg / "config.yaml").data.hard_negatives == mined


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_adapter(tiny_workdir, monkeypatch):
    from umarvel.training import stages
    from umarvel.training.trainer import ContrastiveTrainer

    overrides = [
        "stages.nli.train.max_steps=6", "train.save_steps=3", "train.per_device_batch_size=8",
        "model.lora.dropout=0.1", "stages.nli.train.learning_rate=1e-3",
    ]
    configs = stages.stage_configs(str(ROOT / "configs" / "tiny" / "progressive.yaml"), overrides)
    straight = configs["nli"]
    straight.run.output_dir = "runs/straight"
    stages.train_contrastive(straight)

    interrupted = load_config(Path("runs/straight/config.yaml"))
    interrupted.run.output_dir = "runs/interrupted"
    original = ContrastiveTrainer.training_step

    def crash_after_checkpoint(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise _Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContrastiveTrainer, "training_step", crash_after_checkpoint)
    with pytest.raises(_Interrupt):
        stages.train_contrastive(interrupted)
    monkeypatch.setattr(ContrastiveTrainer, "training_step", original)
    assert (Path("runs/interrupted/checkpoint-3") / "adapter_model.safetensors").is_file()
    with pytest.raises(Exception, match="--resume"):
        stages.train_contrastive(interrupted)
    stages.train_contrastive(interrupted, resume=True)

    a = load_file("runs/straight/model/adapter_model.safetensors")
    b = load_file("runs/interrupted/model/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert _losses(Path("runs/straight"))[3:] == pytest.approx(_losses(Path("runs/interrupted"))[3:], abs=1e-5)


def test_pair_collation_runs_in_dataloader_workers(embedder, synthetic_dir):
    from umarvel.data.mbeir import MBEIR, MBEIRTrainPairs

    mbeir = MBEIR(synthetic_dir / "M-BEIR")
    pairs = MBEIRTrainPairs(mbeir.queries("train"), mbeir.global_pool("train"), seed=0)
    collate = PairCollator(embedder.collator)
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, num_workers=2, collate_fn=collate)
    in_workers = next(iter(loader))
    in_process = collate([pairs[i] for i in range(4)])
    for side in ("query", "positive"):
        for key, value in in_process[side].items():
            assert torch.equal(in_workers[side][key], value)
