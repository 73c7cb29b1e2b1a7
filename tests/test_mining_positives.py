"""`mine()` removes *every* positive of a query from its negatives, not only the first listed.

A hand-made pool and a keyword embedder (tests/mini_mbeir.py) fix the ranking exactly: the
query's second positive ranks first and its first positive third, so a miner that built the
positive set from `pos_cand_list[0]` would hand the best positive back as the top hard
negative. With the tiny random model of test_mining.py the second positives of the synthetic
queries rank far below the top k, so that bug would pass there unnoticed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mini_mbeir import KeywordEmbedder, query, text_candidate, write_jsonl, write_mini_mbeir
from umarvel.config import EncodeConfig, MineConfig
from umarvel.data.sources import read_hard_negatives
from umarvel.data.tasks import GLOBAL_POOL, UNION_TRAIN_QUERIES
from umarvel.retrieval.mining import mine, select_negatives

ROW = "webqa_task1"  # text -> text
# Scores against the query "alpha beta" (keyword counts, cosine):
POOL = [
    text_candidate("2:1", "alpha beta gamma"),  # 0.816  first positive, ranks 3rd
    text_candidate("2:2", "alpha beta"),  # 1.000  second positive, ranks 1st
    text_candidate("2:3", "alpha alpha beta gamma"),  # 0.866
    text_candidate("2:4", "alpha"),  # 0.707
    text_candidate("2:5", "beta gamma delta"),  # 0.408
    text_candidate("2:6", "gamma"),  # 0.000
    text_candidate("5:9", "alpha alpha alpha beta"),  # 0.894  another dataset: searched in "union" scope only
]
QUERY = query(ROW, "2:100", "alpha beta", ["2:1", "2:2"])
OTHER = query(ROW, "2:101", "delta", ["2:5"])  # delta: 2:5 scores 0.577, every other 0


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))
    root = write_mini_mbeir(tmp_path / "M-BEIR", {}, {})  # instructions (and unused eval pools)
    write_jsonl(root / UNION_TRAIN_QUERIES, [QUERY, OTHER, QUERY])  # upsampled: qid 2:100 twice
    write_jsonl(root / GLOBAL_POOL.format(split="train"), POOL)
    return root


def mined(root: Path, tmp_path: Path, **settings) -> tuple[dict[str, list[str]], dict]:
    """(qid -> hard negatives, the per-task stats)."""
    embedder = KeywordEmbedder(["alpha", "beta", "gamma", "delta"], tmp_path)
    config = MineConfig(depth=len(POOL), top_k=3, **settings)
    out = tmp_path / f"hardneg-{len(list(tmp_path.glob('hardneg-*.jsonl')))}.jsonl"
    summary = mine(embedder, root, out, config, EncodeConfig(cache_dir=str(tmp_path / "cache")), progress=False)
    return {qid: dids for qid, dids, _ in read_hard_negatives(out)}, summary["tasks"]


@pytest.mark.parametrize("scope, first", [("union", "5:9"), ("task", None)])
def test_a_second_positive_ranked_first_is_not_a_hard_negative(root, tmp_path, scope, first):
    negatives, tasks = mined(root, tmp_path, scope=scope, threshold=1.0)
    assert list(negatives) == ["2:100", "2:101"]  # one list per qid, in file order
    assert negatives["2:100"] == ([first] if first else []) + ["2:3", "2:4", "2:5"][: 3 - bool(first)]
    assert len(negatives["2:101"]) == 3 and "2:5" not in negatives["2:101"]  # the rest tie at 0
    assert list(tasks) == ["2:task1"]
    stats = tasks["2:task1"]
    assert (stats["queries"], stats["short_queries"], stats["positives_removed"], stats["filtered"]) == (2, 0, 3, 0)
    assert stats["kept_scores"]["count"] == 6 and stats["filtered_scores"] == {"count": 0}


@pytest.mark.parametrize("fraction, expected, filtered", [
    # best positive = 2:2 (1.0): ceiling 0.9 keeps 2:3 (0.866); from the first positive
    # alone (0.9 x 0.816 = 0.73) it would drop 2:3 too.
    (0.9, ["2:3", "2:4", "2:5"], 0),
    # ceiling 0.85 drops 2:3; without a best positive nothing would be dropped, with the first
    # positive's (0.69) 2:4 would go too.
    (0.85, ["2:4", "2:5", "2:6"], 1),
])
def test_the_relative_filter_uses_the_best_of_all_positives(root, tmp_path, fraction, expected, filtered):
    negatives, tasks = mined(root, tmp_path, scope="task", threshold=1.0, max_fraction_of_positive=fraction)
    assert negatives["2:100"] == expected
    assert tasks["2:task1"]["filtered"] == filtered


def test_a_score_at_the_threshold_is_kept():
    kept, _, filtered, _ = select_negatives(["a", "b"], [0.9, 0.5], set(), MineConfig(top_k=2, threshold=0.9), None)
    assert (kept, filtered) == (["a", "b"], [])
