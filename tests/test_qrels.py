"""qrels lines with relevance <= 0 name judged non-relevant candidates: never a hit.

Every synthetic qrels line has relevance 1, so without these tests a reader that kept the
relevance-0 lines would pass and quietly raise every recall that ranks such a candidate.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mini_mbeir import KeywordEmbedder, query, text_candidate, write_mini_mbeir
from umarvel.config import EncodeConfig, MBEIREvalConfig
from umarvel.data.arrowtable import ErrorLog
from umarvel.data.mbeir import MBEIR, read_qrels
from umarvel.data.tasks import EVAL_ROWS_BY_NAME
from umarvel.evaluation.mbeir import MBEIREvaluator, selected_rows

INFOSEEK = "infoseek_task6"
POOL = [text_candidate("6:1", "alpha"), text_candidate("6:2", "beta"), text_candidate("6:3", "gamma")]
QUERIES = [query(INFOSEEK, "6:10", "alpha", ["6:3"]), query(INFOSEEK, "6:11", "beta", ["6:2"])]
# 6:10 ranks 6:1 first, judged non-relevant (0); 6:11 ranks 6:2 first, its positive.
JUDGED_NOT_RELEVANT = ["6:10 0 6:1 0 6", "6:10 0 6:2 -1 6", "6:12 0 6:3 0 6"]


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))
    root = write_mini_mbeir(tmp_path / "M-BEIR", {INFOSEEK: QUERIES}, {INFOSEEK: POOL})
    qrels = root / EVAL_ROWS_BY_NAME[INFOSEEK].qrels_file("test")
    qrels.write_text(qrels.read_text() + "\n".join(JUDGED_NOT_RELEVANT) + "\n6:11 0 6:1 2 6\n")
    return root


def test_read_qrels_keeps_only_positive_relevance(root):
    qrels = read_qrels(root / EVAL_ROWS_BY_NAME[INFOSEEK].qrels_file("test"), ErrorLog())
    assert qrels["6:10"] == {"6:3"}
    assert qrels["6:11"] == {"6:2", "6:1"}  # relevance 2 is relevant
    assert not qrels.get("6:12")  # only a relevance-0 line: no relevant did
    assert MBEIR(root).qrels("test", INFOSEEK) == qrels


def test_a_top_ranked_candidate_judged_not_relevant_is_not_a_hit(root, tmp_path):
    embedder = KeywordEmbedder(["alpha", "beta", "gamma"], tmp_path)
    encode, settings = EncodeConfig(cache_dir=str(tmp_path / "cache")), MBEIREvalConfig(rows=[INFOSEEK])
    results = MBEIREvaluator(embedder, root, encode, settings, progress=False).evaluate(
        selected_rows([INFOSEEK]), ("local",), tmp_path / "out"
    )
    (result,) = results["local"]
    assert result.recall == {1: 50.0, 5: 100.0, 10: 100.0}  # 6:10's hit is its positive 6:3, at rank 3
