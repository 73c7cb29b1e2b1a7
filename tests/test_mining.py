"""Filtered hard-negative mining: positives never become negatives, the filter holds, the
lists are sorted and at most k long, and mining is deterministic and resumable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel import Embedder
from umarvel.cli import main
from umarvel.config import EncodeConfig, MineConfig
from umarvel.data.mbeir import MBEIR
from umarvel.data.sources import read_hard_negatives
from umarvel.retrieval.mining import mine, select_negatives


def test_select_negatives_removes_positives_then_filters_then_keeps_top_k():
    ranked = ["p1", "a", "b", "p2", "c", "d", "e"]
    scores = [0.99, 0.97, 0.93, 0.92, 0.90, 0.80, 0.70]
    config = MineConfig(top_k=2, threshold=0.95)
    kept, kept_scores, filtered, removed = select_negatives(ranked, scores, {"p1", "p2"}, config, best_positive=0.99)
    assert (kept, kept_scores, filtered, removed) == (["b", "c"], [0.93, 0.90], [0.97], 2)
    relative = MineConfig(top_k=5, threshold=1.0, max_fraction_of_positive=0.9)
    kept, _, filtered, _ = select_negatives(ranked, scores, {"p1", "p2"}, relative, best_positive=0.99)
    assert kept == ["d", "e"] and filtered == [0.97, 0.93, 0.90]


@pytest.fixture(scope="module")
def mined(tiny_model_dir, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mine") / "hardneg.jsonl"
    config = MineConfig(depth=400, top_k=5, threshold=1.0, max_fraction_of_positive=1.0)
    encode_config = EncodeConfig(cache_dir=str(out.parent / "cache"), shard_size=64)
    embedder = Embedder.from_pretrained(tiny_model_dir)
    summary = mine(embedder, synthetic_dir / "M-BEIR", out, config, encode_config, progress=False)
    return out, config, summary, embedder, encode_config


def test_no_positive_is_a_negative_and_the_filter_holds(mined, synthetic_dir):
    out, config, summary, embedder, _ = mined
    negatives = read_hard_negatives(out)
    assert negatives.header["params"]["top_k"] == 5 and negatives.header["model"] == summary["model"]
    queries = MBEIR(synthetic_dir / "M-BEIR").queries("train")
    positives = {queries.record(i)["qid"]: set(queries.record(i)["pos_cand_list"]) for i in range(len(queries))}
    assert len(negatives) == len(positives)
    checked = 0
    for qid, dids, scores in negatives:
        assert not set(dids) & positives[qid]
        assert len(dids) <= config.top_k and len(set(dids)) == len(dids)
        assert scores == sorted(scores, reverse=True)
        checked += bool(dids)
    assert checked > len(negatives) // 2
    tasks = summary["tasks"]
    assert sum(t["filtered"] for t in tasks.values()) > 0
    for task in tasks.values():
        if task["kept_scores"]["count"] and task["filtered_scores"]["count"]:
            assert task["filtered_scores"]["mean"] >= task["kept_scores"]["mean"] - 1e-6


def test_kept_scores_respect_the_relative_filter(mined, synthetic_dir):
    out, config, _, embedder, _ = mined
    negatives = read_hard_negatives(out)
    mbeir = MBEIR(synthetic_dir / "M-BEIR")
    queries, pool = mbeir.queries("train"), mbeir.global_pool("train")
    for index in range(0, len(queries), 50):
        record = queries.record(index)
        dids, scores = negatives.get(record["qid"])
        if not dids:
            continue
        query = embedder.encode([queries.item(index)], convert_to_tensor=True)
        positives = embedder.encode([pool.get(d) for d in record["pos_cand_list"] if d in pool], convert_to_tensor=True)
        best = float((positives @ query.T).max())
        assert max(scores) <= config.max_fraction_of_positive * best + 1e-3


def test_mining_is_deterministic_and_reuses_the_encoding(mined, synthetic_dir, monkeypatch, tmp_path):
    out, config, _, embedder, encode_config = mined
    calls = []
    original = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    again = tmp_path / "again.jsonl"
    mine(embedder, synthetic_dir / "M-BEIR", again, config, encode_config, progress=False)
    assert not calls, "a second mining run with the same model must re-use the cached encoding"
    assert again.read_bytes() == out.read_bytes()


def test_mine_negatives_cli_writes_file_and_stats(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "neg.jsonl"
    code = main([
        "mine-negatives", "--model", str(tiny_model_dir), "--data", str(synthetic_dir / "M-BEIR"), "--out", str(out),
        "--set", f"encode.cache_dir={tmp_path / 'cache'}", "--set", "mine.top_k=3", "--set", "mine.scope=task",
        "--set", "mine.threshold=1.0",
    ])
    assert code == 0
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert stats["params"]["scope"] == "task"
    negatives = read_hard_negatives(out)
    for qid, dids, _ in negatives:
        assert all(d.split(":")[0] == qid.split(":")[0] for d in dids), "task scope stays in the query's dataset"
    table = capsys.readouterr().out
    assert "mscoco task0" in table and "9:task0" not in table  # dataset names, not ids
    assert "short: queries left with fewer than mine.top_k = 3 negatives" in table
    assert "filtered: filter off (mine.threshold = 1.0 >= 1, mine.max_fraction_of_positive = 0.0): no candidate dropped" in table
    assert "top-1 neg p5/p50/p95" in table
