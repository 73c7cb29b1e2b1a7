"""The YES/NO reranker: P(YES) and the answer loss against the model's own logits, save/load,
training pairs, the fusion formula, alpha chosen on val only, and the tiny recipe via the CLI."""
from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import draw_image
from umarvel import Embedder
from umarvel.cli import main
from umarvel.config import EncodeConfig, MBEIREvalConfig, PromptConfig, load_config
from umarvel.data.collator import load_image
from umarvel.data.mbeir import MBEIR
from umarvel.data.prompts import RERANK_QUESTION, render_pair
from umarvel.data.rerank import IGNORED_LABEL
from umarvel.errors import UmarvelError
from umarvel.evaluation.mbeir import RowQueries, selected_rows
from umarvel.evaluation.rerank import ALPHA_GRID, RerankingEvaluator
from umarvel.modeling.reranker import Reranker
from umarvel.retrieval.rerank import fuse, fused_rankings, select_pairs

ROOT = Path(__file__).resolve().parents[1]
QUERY = {"text": "two red circles on the left", "instruction": "Find the matching image."}
PAIRS = [
    (QUERY, {"image": draw_image("red")}),
    (QUERY, {"text": "a blue square at the top, drawn with a thin outline and nothing else around it"}),
    ({"image": draw_image("green", "square")}, {"image": draw_image("green"), "text": "a green circle"}),
]


@pytest.fixture(autouse=True)
def table_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))


def _adapted_reranker(model_dir) -> Reranker:
    """A tiny reranker whose adapter is not the identity, so scores depend on it."""
    model = Reranker.from_pretrained(model_dir, trainable=True, lora={"dropout": 0.0})
    generator = torch.Generator().manual_seed(0)
    for name, param in model.backbone.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module")
def reranker(tiny_model_dir):
    return _adapted_reranker(tiny_model_dir)


@pytest.fixture(scope="module")
def family_reranker(family_model_dir):
    """The same, on every backbone family in turn."""
    return _adapted_reranker(family_model_dir)


def _single_pair_inputs(reranker, query, candidate):
    """The processor's inputs for one pair alone: no padding, no collator."""
    prompt = reranker.settings.prompt
    rendered = render_pair(query, candidate, prompt, reranker.family.chat, reranker.processor.tokenizer)
    images = [load_image(image, prompt, reranker.family) for image in rendered.images]
    return reranker.processor(text=[rendered.text], images=images or None, return_tensors="pt",
                              return_mm_token_type_ids=True)


def test_pair_prompt_holds_query_then_candidate_and_cuts_each_text_to_the_budget(reranker):
    tokenizer = reranker.processor.tokenizer
    long = "the quick brown fox jumps over the lazy dog " * 20
    out = render_pair({"image": "q.png", "text": long, "instruction": "Find it."}, {"image": "c.png", "text": long},
                      PromptConfig(system_prompt="", max_text_tokens=12), reranker.family.chat, tokenizer)
    assert out.images == ["q.png", "c.png"]
    user, query_line, candidate_line, question = out.text.split("\n")[:4]
    assert user == "<|im_start|>user" and question == f"{RERANK_QUESTION}<|im_end|>"
    assert out.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    query_text = query_line.removeprefix(f"Query: {reranker.family.chat.image}")
    candidate_text = candidate_line.removeprefix(f"Candidate: {reranker.family.chat.image}")
    assert query_text.startswith("Find it. the quick") and candidate_text.startswith("the quick")

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert tokens("Find it.") + tokens(query_text.removeprefix("Find it. ")) <= 12
    assert tokens(candidate_text) == 12


def test_score_is_p_yes_over_yes_and_no_at_the_last_prompt_token(family_reranker):
    reranker = family_reranker
    tokenizer = reranker.processor.tokenizer
    yes, no = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("YES", "NO"))
    batched = reranker.score(PAIRS, batch_size=len(PAIRS))  # padded together
    expected = []
    with torch.no_grad():
        for query, candidate in PAIRS:
            logits = reranker.backbone(**_single_pair_inputs(reranker, query, candidate)).logits[0, -1]
            expected.append(math.exp(logits[yes]) / (math.exp(logits[yes]) + math.exp(logits[no])))
    assert batched.dtype == torch.float32
    assert batched.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # the pairs are told apart, so the check has teeth


def test_training_labels_only_the_appended_answer_and_the_loss_is_its_next_token_loss(family_reranker):
    reranker = family_reranker
    examples = [{"query": q, "candidate": c, "answer": a} for (q, c), a in zip(PAIRS, ["YES", "NO", "NO"])]
    batch = reranker.collator(examples)
    prompt_lengths = reranker.collator([{"query": q, "candidate": c} for q, c in PAIRS])["attention_mask"].sum(dim=1)
    answer_ids = [reranker.answer_ids[e["answer"]] for e in examples]
    for row, (length, answer) in enumerate(zip(prompt_lengths.tolist(), answer_ids)):
        labelled = (batch["labels"][row] != IGNORED_LABEL).nonzero().flatten().tolist()
        assert labelled == [length]
        assert batch["labels"][row, length] == batch["input_ids"][row, length] == answer
        assert batch["attention_mask"][row].sum() == length + 1
    with torch.no_grad():
        ours = reranker(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        theirs = reranker.backbone(**inputs, labels=batch["labels"]).loss  # transformers' own shifted loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_save_and_load_give_identical_scores(family_reranker, tmp_path):
    reranker = family_reranker
    reranker.save_pretrained(tmp_path / "run" / "model")
    before = reranker.score(PAIRS)
    for path in (tmp_path / "run", tmp_path / "run" / "model"):
        loaded = Reranker.from_pretrained(path)
        assert torch.equal(loaded.score(PAIRS), before)
        assert loaded.source == tmp_path / "run" / "model"
    record = json.loads((tmp_path / "run" / "model" / "reranker_config.json").read_text())
    assert Path(tmp_path / "run" / "model" / record["backbone_relative"]).resolve() == Path(record["model"]["backbone"])


def test_an_embedder_directory_is_not_a_reranker(tiny_model_dir, tmp_path):
    Embedder.from_pretrained(tiny_model_dir, trainable=True).save_pretrained(tmp_path / "embedder")
    with pytest.raises(UmarvelError, match="is an embedder"):
        Reranker.from_pretrained(tmp_path / "embedder")
    with pytest.raises(UmarvelError, match="attention=causal"):
        Reranker.from_pretrained(tiny_model_dir, attention="bidirectional")


def test_fusion_is_the_weighted_sum_of_recall_and_rerank_scores():
    assert fuse(0.8, 0.2, 0.3) == pytest.approx(0.3 * 0.8 + 0.7 * 0.2)
    recall = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.4, 0.1]], dtype=np.float32)
    ranked = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    rerank = [[0.1, 0.9, 0.5], [0.2, 0.2, 0.9]]
    scores, order = fused_rankings(recall, ranked, rerank, alpha=0.5)
    # a .5*.9+.5*.1=.50  b .40+.45=.85  c .35+.25=.60  d (not reranked) .30+0
    # e .25+.10=.35  f .25+.10=.35 (tie: recall order)  g .20+.45=.65  h .05+0
    assert order == [["b", "c", "a", "d"], ["g", "e", "f", "h"]]
    np.testing.assert_allclose(scores, [[0.85, 0.60, 0.50, 0.30], [0.65, 0.35, 0.35, 0.05]], atol=1e-6)
    assert fused_rankings(recall, ranked, rerank, alpha=1.0)[1] == ranked
    assert fused_rankings(recall, ranked, rerank, alpha=0.0)[1] == [["b", "c", "a", "d"], ["g", "e", "f", "h"]]


def test_training_pairs_label_positives_yes_the_rest_no_with_a_seeded_count():
    ranked = ["9:5", "9:1", "9:7", "9:2", "9:8", "9:9", "9:3"]
    positives = ["9:1", "9:2"]
    pairs = select_pairs("9:0", ranked, positives, negatives_per_positive=3, seed=0)
    answers = Counter(p.answer for p in pairs)
    assert answers == {"YES": 1, "NO": 3}
    assert all((p.did in positives) == (p.answer == "YES") for p in pairs)
    assert {p.qid for p in pairs} == {"9:0"}
    assert select_pairs("9:0", ranked, positives, 3, seed=0) == pairs
    draws = {tuple(select_pairs(f"9:{q}", ranked, positives, 3, seed=s)) for q in range(5) for s in (0, 1)}
    assert len(draws) > 2  # the seed and the query change the draw
    every = select_pairs("9:0", ranked, positives, negatives_per_positive=0, seed=0)
    assert [p.did for p in every if p.answer == "NO"] == ["9:5", "9:7", "9:8", "9:9", "9:3"]
    short = select_pairs("9:0", ranked[:3], positives, negatives_per_positive=5, seed=0)
    assert Counter(p.answer for p in short) == {"YES": 1, "NO": 2}


def test_auto_alpha_is_chosen_on_val_before_any_test_qrels_are_read(reranker, tiny_model_dir, synthetic_dir,
                                                                    tmp_path, monkeypatch):
    reads = []
    original = MBEIR.qrels

    def recording_qrels(self, split, row):
        reads.append(split)
        return original(self, split, row)

    monkeypatch.setattr(MBEIR, "qrels", recording_qrels)
    rows = selected_rows(["mscoco_task0", "cirr_task7"])
    encode = EncodeConfig(cache_dir=str(tmp_path / "cache"))
    settings = MBEIREvalConfig(rows=[r.name for r in rows], top_k=10)
    evaluator = RerankingEvaluator(Embedder.from_pretrained(tiny_model_dir), reranker, synthetic_dir / "M-BEIR",
                                   encode, settings, top_k=10, alpha="auto", progress=False)
    evaluator.evaluate(rows, ("local",), tmp_path / "out")
    assert reads == ["val"] * len(rows) + ["test"] * len(rows)
    block = json.loads((tmp_path / "out" / "local" / "results.json").read_text())["rerank"]
    assert block["chosen_on"] == "val" and block["top_k"] == 10
    averages = {float(a): v for a, v in block["val_average_by_alpha"].items()}
    assert sorted(averages) == list(ALPHA_GRID)
    assert block["alpha"] == max(a for a, v in averages.items() if v == max(averages.values()))


def test_one_reranker_pass_over_all_rows_gives_each_row_its_own_scores(reranker, tiny_model_dir, synthetic_dir,
                                                                       tmp_path):
    rows = selected_rows(["mscoco_task0", "cirr_task7", "fashioniq_task7"])
    settings = MBEIREvalConfig(rows=[r.name for r in rows], top_k=10)
    evaluator = RerankingEvaluator(Embedder.from_pretrained(tiny_model_dir), reranker, synthetic_dir / "M-BEIR",
                                   EncodeConfig(cache_dir=str(tmp_path / "cache")), settings, top_k=4, progress=False)
    searches = [RowQueries(row, "test", evaluator.queries(row), "local", evaluator.local_pool(row), 10) for row in rows]
    together = evaluator.reranked(searches)
    for search, (recall, ranked, scores) in zip(searches, together):
        (alone_recall, alone_ranked, alone_scores), = evaluator.reranked([search])
        assert len(scores) == len(search.queries.ids) and all(len(s) == 4 for s in scores)
        assert ranked == alone_ranked and np.array_equal(recall, alone_recall)
        assert np.allclose(scores, alone_scores, atol=1e-6)
    assert not np.allclose(together[0][2][0], together[1][2][0], atol=1e-3)  # rows' scores differ: a shift would show


def test_cli_prints_the_chosen_alpha_and_writes_the_pool_folder_as_plain_eval(reranker, tiny_model_dir,
                                                                               synthetic_dir, tmp_path, capsys):
    reranker.save_pretrained(tmp_path / "reranker" / "model")
    code = main(["eval", "mbeir", "--model", str(tiny_model_dir), "--data", str(synthetic_dir), "--output-dir",
                 str(tmp_path / "out"), "--rerank", str(tmp_path / "reranker"), "--rerank-top-k", "5",
                 "--set", "eval.mbeir.rows=[mscoco_task0]", "--set", f"encode.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    alpha = json.loads((tmp_path / "out" / "local" / "results.json").read_text())["rerank"]["alpha"]
    assert f"local: U-MARVEL+ top 5 re-scored, S = a*S_recall + (1-a)*S_rerank with a = {alpha:.2f} " \
           "(chosen on the val queries)" in capsys.readouterr().out


def test_paper_reranker_config_has_the_published_settings():
    config = load_config(ROOT / "configs" / "umarvel" / "reranker.yaml")
    assert config.model.attention == "causal" and config.model.prompt.max_text_tokens == 256
    assert (config.model.lora.r, config.model.lora.alpha) == (128, 256)
    assert config.train.learning_rate == pytest.approx(2e-5)
    assert config.train.per_device_batch_size * 64 == 128
    assert config.rerank.top_n == 50


@pytest.mark.slow
def test_tiny_reranker_recipe_through_the_cli(tiny_workdir):
    config = str(ROOT / "configs" / "tiny" / "reranker.yaml")
    overrides = ["--set", "rerank.recall_model=checkpoints/tiny-qwen2vl", "--set", "train.max_steps=12",
                 "--set", "train.per_device_batch_size=8", "--set", "train.learning_rate=1e-2",
                 "--set", "encode.cache_dir=cache"]
    assert main(["train", "--stage", "reranker", "--config", config, *overrides]) == 0
    run = tiny_workdir / "runs" / "tiny" / "reranker"
    assert (run / "DONE").is_file() and (run / "model" / "reranker_config.json").is_file()
    lines = (run / "pairs.jsonl").read_text().splitlines()[1:]
    per_query = Counter()
    for line in lines:
        pair = json.loads(line)
        per_query[pair["qid"], pair["answer"]] += 1
    qids = {qid for qid, _ in per_query}
    assert all(per_query[qid, "YES"] == 1 and per_query[qid, "NO"] == 3 for qid in qids)
    losses = [e["loss"] for e in json.loads((run / "log_history.json").read_text()) if "loss" in e]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["eval", "mbeir", "--pool", "local", "--model", "checkpoints/tiny-qwen2vl",
                     "--data", "data/synthetic/M-BEIR", "--output-dir", "eval", "--rerank", str(run),
                     "--rerank-top-k", "10", "--alpha", "auto", "--config", config,
                     "--set", "eval.mbeir.rows=[mscoco_task0,webqa_task1,cirr_task7]", "--set", "encode.cache_dir=cache"])
    assert code == 0
    results = json.loads((tiny_workdir / "eval" / "local" / "results.json").read_text())
    assert list(results["rows"]) == ["mscoco_task0", "webqa_task1", "cirr_task7"]
    assert results["rerank"]["chosen_on"] == "val" and results["rerank"]["alpha"] in ALPHA_GRID
    assert results["rerank"]["model"] == str(run / "model")
