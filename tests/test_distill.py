"""Stage 3, distillation: the batch layout under the KL loss (plain and GradCache), the teacher
file (round trip, resume after a kill, settings it refuses), seeded query sampling, and the
tiny recipe reranker -> distill -> eval with rerank through the CLI."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from conftest import draw_image
from umarvel import Embedder
from umarvel.cli import main
from umarvel.config import Config, ConfigError, LossConfig, load_config
from umarvel.data.collator import DistillCollator
from umarvel.data.sources import read_teacher_scores
from umarvel.errors import DataError, UmarvelError
from umarvel.modeling.model_dir import locate
from umarvel.retrieval import teacher as teacher_module
from umarvel.retrieval.rerank import first_rows
from umarvel.retrieval.teacher import (
    TeacherScoring, candidate_list, choose_positive, retrieve, sample_query_rows, shard_name,
)
from umarvel.training import gradcache
from umarvel.training.distill import DistillationTrainer, check_distill_config
from umarvel.training.rerank import training_data

ROOT = Path(__file__).resolve().parents[1]
TEACHER = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.9, 0.3, 0.2], [-0.5, 0.0, 1.5, 3.0]]


@pytest.fixture(autouse=True)
def table_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    emb = Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"dropout": 0.0},
                                   temperature={"init": 0.07, "learnable": True},
                                   prompt={"min_pixels": 3136, "max_pixels": 3136})
    generator = torch.Generator().manual_seed(0)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return emb


def _examples() -> list[dict]:
    """Three queries, four candidates each (text, image, both), every candidate different."""
    colours = ["red", "green", "blue"]
    examples = []
    for q, colour in enumerate(colours):
        candidates = [
            {"did": f"9:{10 * q}", "image": draw_image(colour)},
            {"did": f"9:{10 * q + 1}", "text": f"a {colour} square number {q}"},
            {"did": f"9:{10 * q + 2}", "image": draw_image(colours[q - 1], "square"), "text": "a square"},
            {"did": f"9:{10 * q + 3}", "text": f"nothing {colour} here at all, query {q}"},
        ]
        query = {"qid": f"9:{q}", "text": f"one {colour} circle", "instruction": "Find the image."}
        examples.append({"query": query, "candidates": candidates, "teacher_scores": TEACHER[q]})
    return examples


def _trainer(embedder, tmp_path, teacher_temperature: float) -> DistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none",
                             per_device_train_batch_size=3)
    return DistillationTrainer(model=embedder, args=args, loss_config=LossConfig(),
                               teacher_temperature=teacher_temperature)


def _hand_loss(embedder, examples, teacher_rows, tau, teacher_tau) -> float:
    """Mean over queries of KL(softmax(teacher / teacher_tau) || softmax(cos / tau)), item by item."""
    def softmax(values, scale):
        top = max(values)
        weights = [math.exp((v - top) / scale) for v in values]
        return [w / sum(weights) for w in weights]

    total = 0.0
    for example, teacher in zip(examples, teacher_rows):
        query = embedder.encode([example["query"]], convert_to_tensor=True)[0]
        candidates = embedder.encode(example["candidates"], batch_size=1, convert_to_tensor=True)
        student = softmax((candidates @ query).tolist(), tau)
        target = softmax(teacher, teacher_tau)
        total += sum(t * math.log(t / s) for t, s in zip(target, student))
    return total / len(examples)


@pytest.mark.parametrize("teacher_temperature", [0.0, 0.5])
def test_distillation_batch_scores_each_querys_candidates_against_its_own_teacher_row(embedder, tmp_path,
                                                                                      teacher_temperature):
    examples = _examples()
    batch = DistillCollator(embedder.collator)(examples)
    assert batch["candidate"]["input_ids"].shape[0] == 12 and batch["teacher_scores"].shape == (3, 4)
    assert torch.equal(batch["teacher_scores"], torch.tensor(TEACHER))
    trainer = _trainer(embedder, tmp_path, teacher_temperature)
    embedder.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(embedder, batch).item()
    tau = embedder.temperature.value
    teacher_tau = teacher_temperature or tau  # 0 = the student's own temperature
    assert loss == pytest.approx(_hand_loss(embedder, examples, TEACHER, tau, teacher_tau), rel=1e-4)
    # Teeth: the same candidates scored against another query's teacher row give another loss.
    shifted = TEACHER[1:] + TEACHER[:1]
    assert abs(loss - _hand_loss(embedder, examples, shifted, tau, teacher_tau)) > 1e-2


def test_distillation_loss_through_gradcache_matches_the_plain_gradients(embedder, tmp_path, monkeypatch):
    batch = DistillCollator(embedder.collator)(_examples())
    trainer = _trainer(embedder, tmp_path, teacher_temperature=0.0)
    embedder.train()
    token_chunks, real = [], gradcache.token_chunks

    def recording(*args):
        token_chunks.append(real(*args))
        return token_chunks[-1]

    monkeypatch.setattr(gradcache, "token_chunks", recording)

    def gradients(chunk_size: int, chunk_tokens: int | None = None) -> tuple[float, dict]:
        trainer.loss_config.gradcache_chunk_size = chunk_size
        trainer.loss_config.gradcache_chunk_tokens = chunk_tokens
        embedder.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(embedder, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad and p.grad is not None}
        return loss.item(), grads

    plain_loss, plain = gradients(0)
    cached_loss, cached = gradients(5)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == cached.keys() and "temperature.tau" in plain
    scale = max(g.abs().max().item() for g in plain.values())
    worst = max((plain[n] - cached[n]).abs().max().item() for n in plain)
    assert scale > 1e-4 and worst / scale < 1e-5, (worst, scale)
    by_tokens_loss, by_tokens = gradients(0, chunk_tokens=200)  # the trainer reads train.loss.gradcache_chunk_tokens
    assert token_chunks and any(len(counts) > 1 for counts in token_chunks), token_chunks
    assert by_tokens_loss == pytest.approx(plain_loss, rel=1e-6)
    worst = max((plain[n] - by_tokens[n]).abs().max().item() for n in plain)
    assert worst / scale < 1e-5, (worst, scale)


def test_distillation_collator_refuses_ragged_candidate_lists(embedder):
    examples = _examples()
    examples[1]["candidates"] = examples[1]["candidates"][:3]
    with pytest.raises(DataError, match="query 9:1 has 3 teacher-scored candidates"):
        DistillCollator(embedder.collator)(examples)


def _config(synthetic_dir: Path, tmp_path: Path, model_dir: Path, **distill) -> Config:
    config = Config()
    config.model.backbone = str(model_dir)
    config.data.path = str(synthetic_dir / "M-BEIR")
    config.encode.cache_dir = str(tmp_path / "embeddings")
    config.run.output_dir = str(tmp_path / "run")
    config.run.seed = 0
    settings = {"reranker": str(model_dir), "fraction": 0.25, "top_k": 5, "shard_size": 4, "alpha": 0.5, **distill}
    for key, value in settings.items():
        setattr(config.distill, key, value)
    return config


def test_sampling_is_seeded_and_takes_the_configured_fraction(embedder, synthetic_dir, tmp_path):
    config = _config(synthetic_dir, tmp_path, Path(embedder.settings.backbone))
    queries, pool = training_data(config)
    distinct = len(first_rows(queries))
    for how in ("per_task", "uniform"):
        rows = sample_query_rows(queries, 0.25, 0, how)
        assert rows == sample_query_rows(queries, 0.25, 0, how) == sorted(rows)
        assert len({queries.record(r)["qid"] for r in rows}) == len(rows)
        assert rows != sample_query_rows(queries, 0.25, 1, how)
        assert len(sample_query_rows(queries, 1.0, 0, how)) == distinct
    assert len(sample_query_rows(queries, 0.25, 0, "uniform")) == round(0.25 * distinct)
    assert len(sample_query_rows(queries, 1e-6, 0, "uniform")) == 1

    positives = ["9:1", "9:2", "9:3"]
    assert choose_positive("9:0", positives, 0) == choose_positive("9:0", positives, 0)
    assert len({choose_positive(f"9:{q}", positives, seed) for q in range(10) for seed in (0, 1)}) > 1
    assert candidate_list("9:2", ["9:5", "9:2", "9:7", "9:8"], top_k=2) == ["9:2", "9:5", "9:7"]
    assert candidate_list("9:2", ["9:5", "9:7"], top_k=2) == ["9:2", "9:5", "9:7"]

    def lists(seed: int) -> list[dict]:
        sample = sample_query_rows(queries, 0.25, seed)
        records, skipped = retrieve(embedder, queries, pool, sample, config.distill, config.encode, seed=seed,
                                    progress=False)
        assert len(records) + len(skipped) == len(sample)
        return records

    first = lists(0)
    assert first == lists(0)
    assert [r["qid"] for r in first] != [r["qid"] for r in lists(1)]
    for record in first:
        assert len(record["candidates"]) == len(set(record["candidates"])) == 6
        assert record["candidates"][0] in queries.record(queries.find(record["qid"]))["pos_cand_list"]


class _Killed(Exception):
    pass


def _scoring(config: Config, model_dir: Path) -> TeacherScoring:
    queries, pool = training_data(config)
    return TeacherScoring(config, queries, pool, locate(model_dir), model_dir, device="cpu", progress=False)


def test_teacher_file_round_trip_and_resume_after_a_kill(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    clean = _config(synthetic_dir, tmp_path, tiny_model_dir, teacher_file=str(tmp_path / "clean" / "teacher.jsonl"))
    path = _scoring(clean, tiny_model_dir).run()
    teacher = read_teacher_scores(path)
    queries, _ = training_data(clean)
    assert teacher.header["params"]["alpha"] == 0.5 and teacher.header["params"]["top_k"] == 5
    assert len(teacher) + teacher.header["params"]["skipped_queries"] == len(sample_query_rows(queries, 0.25, 0))
    assert teacher.header["params"]["sample"] == "per_task"
    shard_files = sorted(Path(str(path) + ".work").glob("shard-*.jsonl"))
    assert len(shard_files) == math.ceil(len(teacher) / 4) > 2
    shards = [json.loads(line) for file in shard_files for line in file.read_text().splitlines()]
    assert [r["qid"] for r in shards] == [qid for qid, _, _ in teacher]
    for (qid, candidates, scores), shard in zip(teacher, shards):
        assert candidates == shard["candidates"] and len(candidates) == 6
        assert candidates[0] in queries.record(queries.find(qid))["pos_cand_list"]
        expected = 0.5 * np.array(shard["recall"]) + 0.5 * np.array(shard["rerank"])
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    assert np.ptp([s for _, _, row in teacher for s in row]) > 1e-3  # scores are not all alike

    original = teacher_module.rerank_candidates
    calls = []

    def killed_after_one_shard(*args, **kwargs):
        if calls:
            raise _Killed
        calls.append(1)
        return original(*args, **kwargs)

    resumed = _config(synthetic_dir, tmp_path, tiny_model_dir, teacher_file=str(tmp_path / "resumed" / "teacher.jsonl"))
    monkeypatch.setattr(teacher_module, "rerank_candidates", killed_after_one_shard)
    with pytest.raises(_Killed):
        _scoring(resumed, tiny_model_dir).run()
    resumed_path = Path(resumed.distill.teacher_file)
    resumed_work = Path(str(resumed_path) + ".work")
    assert not resumed_path.exists()
    assert sorted(p.name for p in resumed_work.glob("shard-*")) == [shard_name(0)]
    first_shard = (resumed_work / shard_name(0)).read_bytes()

    calls.clear()

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "rerank_candidates", counting)
    _scoring(resumed, tiny_model_dir).run()
    assert len(calls) == len(shard_files) - 1  # every shard but the first
    assert (resumed_work / shard_name(0)).read_bytes() == first_shard
    assert resumed_path.read_bytes() == path.read_bytes()

    # Another alpha: the finished file is refused; without it the kept work is re-merged, not re-scored.
    resumed.distill.alpha = 0.2
    with pytest.raises(UmarvelError, match="alpha: 0.5 there, 0.2 now"):
        _scoring(resumed, tiny_model_dir).run()
    resumed_path.unlink()
    calls.clear()
    reweighted = read_teacher_scores(_scoring(resumed, tiny_model_dir).run())
    assert not calls
    for (_, _, scores), shard in zip(reweighted, shards):
        np.testing.assert_allclose(scores, 0.2 * np.array(shard["recall"]) + 0.8 * np.array(shard["rerank"]), atol=1e-12)

    # Other sampling settings never mix with the work already done.
    resumed.distill.fraction = 0.5
    resumed_path.unlink()
    with pytest.raises(UmarvelError, match="other settings \\(fraction differ\\)"):
        _scoring(resumed, tiny_model_dir).run()
    resumed.distill.fraction, resumed.distill.sample = 0.25, "uniform"
    with pytest.raises(UmarvelError, match="other settings \\(sample differ\\)"):
        _scoring(resumed, tiny_model_dir).run()


def test_distill_config_checks_and_the_paper_settings():
    config = Config()
    config.data.path = "data/M-BEIR"
    with pytest.raises(ConfigError, match="distill.reranker is empty"):
        check_distill_config(config)
    config.distill.reranker = "runs/reranker"
    check_distill_config(config)
    for key, value in [("fraction", 0.0), ("alpha", 1.5), ("top_k", 0), ("teacher_temperature", -1.0),
                       ("shard_size", 0)]:
        with pytest.raises(ConfigError, match=rf"distill\.{key}: .* is out of range"):
            load_config(overrides=["data.path=data/M-BEIR", "distill.reranker=r", f"distill.{key}={value}"])

    paper = load_config(ROOT / "configs" / "umarvel" / "distill.yaml")
    check_distill_config(paper)
    assert paper.distill.fraction == pytest.approx(0.1) and paper.distill.top_k + 1 == 50
    assert paper.train.learning_rate == pytest.approx(1e-5) and paper.model.temperature.learnable
    assert paper.model.backbone == "runs/umarvel/hardneg/merged" and paper.train.loss.gradcache_chunk_size > 0
    assert load_config(ROOT / "configs" / "tiny" / "distill.yaml").distill.reranker == \
        load_config(ROOT / "configs" / "tiny" / "reranker.yaml").run.output_dir


@pytest.mark.slow
def test_tiny_recipe_reranker_then_distill_then_eval_with_rerank_through_the_cli(tiny_workdir):
    tiny = ROOT / "configs" / "tiny"
    cache = ["--set", "encode.cache_dir=cache"]
    # The stage-2 model the recipe starts from, trained briefly without mined negatives.
    assert main(["train", "--stage", "hardneg", "--config", str(tiny / "hardneg.yaml"),
                 "--set", "model.backbone=checkpoints/tiny-qwen2vl", "--set", "data.hard_negatives=",
                 "--set", "data.num_negatives=0", "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--stage", "reranker", "--config", str(tiny / "reranker.yaml"), *cache,
                 "--set", "train.max_steps=2", "--set", "train.per_device_batch_size=8"]) == 0
    assert main(["distill", "--config", str(tiny / "distill.yaml"), *cache]) == 0

    run = tiny_workdir / "runs" / "tiny" / "distill"
    for name in ("DONE", "config.yaml", "metrics.json", "log_history.json", "model/adapter_model.safetensors",
                 "merged/model.safetensors"):
        assert (run / name).is_file(), name
    teacher = read_teacher_scores(run / "teacher.jsonl")
    queries, _ = training_data(load_config(run / "config.yaml"))
    assert len(teacher) + teacher.header["params"]["skipped_queries"] == len(sample_query_rows(queries, 0.25, 0))
    assert teacher.header["params"]["sample"] == "per_task"
    assert all(len(candidates) == 10 and candidates[0] in queries.record(queries.find(qid))["pos_cand_list"]
               for qid, candidates, _ in teacher)
    assert json.loads((run / "metrics.json").read_text())["pairs"] == len(teacher)
    logged = [e for e in json.loads((run / "log_history.json").read_text()) if "kl" in e]
    assert logged and all(e["loss"] == pytest.approx(e["kl"]) for e in logged)
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0, "the student must have trained"

    stamp = (run / "DONE").read_text()
    assert main(["distill", "--config", str(tiny / "distill.yaml"), *cache]) == 0  # finished: left as it is
    assert (run / "DONE").read_text() == stamp

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["eval", "mbeir", "--pool", "local", "--model", str(run), "--data", "data/synthetic/M-BEIR",
                     "--output-dir", "eval", "--rerank", "runs/tiny/reranker", "--rerank-top-k", "10",
                     "--alpha", "auto", "--config", str(tiny / "base.yaml"), *cache,
                     "--set", "eval.mbeir.rows=[mscoco_task0,webqa_task1,cirr_task7]"])
    assert code == 0, stdout.getvalue()
    results = json.loads((tiny_workdir / "eval" / "local" / "results.json").read_text())
    assert list(results["rows"]) == ["mscoco_task0", "webqa_task1", "cirr_task7"]
    assert results["rerank"]["chosen_on"] == "val"
