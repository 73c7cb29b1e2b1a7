"""Stage 2 trains each query with the top-k survivors of mining by score (paper 3.2.2): not a
random draw among them, and no random pool candidates unless asked; the variants are explicit
and counted in the stage's statistics."""
from __future__ import annotations

import pytest

from umarvel.config import ConfigError
from umarvel.data.mbeir import MBEIR, MBEIRTrainPairs, NegativeSelection
from umarvel.data.sources import read_hard_negatives, write_hard_negatives
from umarvel.data.synthetic import write_synthetic
from umarvel.errors import DataError


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = write_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, size="tiny")
    mbeir = MBEIR(root, cache_dir=tmp_path_factory.mktemp("cache"))
    return mbeir.queries("train"), mbeir.global_pool("train")


def _mined(tmp_path, queries, pool, per_query: int, *, short_every: int = 0, top_k: int | None = None):
    """Mined lists whose scores rise along the file order (so 'top by score' is the LAST
    entries, never the first): a reader that takes the file order or samples fails."""
    dids = pool.dids().to_pylist()
    records = []
    unique = {queries.record(i)["qid"]: queries.record(i) for i in range(len(queries))}  # the union file upsamples
    for i, record in enumerate(unique.values()):
        count = 1 if short_every and i % short_every == 0 else per_query
        negatives = [d for d in dids if d not in record["pos_cand_list"]][i % 7 : i % 7 + count]
        records.append({"qid": record["qid"], "negatives": negatives, "scores": [0.1 * j for j in range(count)]})
    path = write_hard_negatives(tmp_path / "neg.jsonl", records, model="m", params={"top_k": top_k or per_query})
    return read_hard_negatives(path, cache_dir=tmp_path / "cache"), {r["qid"]: r for r in records}


def test_top_k_takes_each_querys_highest_scored_survivors(train_set, tmp_path):
    queries, pool = train_set
    mined, records = _mined(tmp_path, queries, pool, per_query=8)
    pairs = MBEIRTrainPairs(queries, pool, seed=0, hard_negatives=mined, negatives=NegativeSelection(3))
    for epoch in (0, 1):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            pair = pairs[i]
            expected = records[pair["query"]["qid"]]["negatives"][::-1][:3]
            assert [n["did"] for n in pair["negatives"]] == expected
    stats = pairs.negative_stats
    assert stats["selection"] == "top" and stats["queries_with_fewer"] == 0 and stats["top_up_slots_per_epoch"] == 0


def test_sampling_among_the_top_m_is_an_explicit_seeded_variant(train_set, tmp_path):
    queries, pool = train_set
    mined, records = _mined(tmp_path, queries, pool, per_query=8)
    pairs = MBEIRTrainPairs(queries, pool, seed=0, hard_negatives=mined,
                            negatives=NegativeSelection(2, "sample", depth=5))
    drawn = set()
    for i in range(len(pairs)):
        pair = pairs[i]
        top5 = records[pair["query"]["qid"]]["negatives"][::-1][:5]
        picked = [n["did"] for n in pair["negatives"]]
        assert len(picked) == 2 and set(picked) <= set(top5)
        drawn.add(tuple(top5.index(d) for d in picked))
        assert [n["did"] for n in pairs[i]["negatives"]] == picked  # seeded
    assert len(drawn) > 3
    with pytest.raises(ConfigError, match="negative_sample_depth"):
        MBEIRTrainPairs(queries, pool, hard_negatives=mined, negatives=NegativeSelection(3, "sample", depth=2))


def test_queries_with_too_few_mined_negatives_stop_skip_or_top_up_and_are_counted(train_set, tmp_path):
    queries, pool = train_set
    mined, records = _mined(tmp_path, queries, pool, per_query=4, short_every=5)
    with pytest.raises(DataError, match=r"have fewer than data.num_negatives=3 mined negatives.*negative_top_up"):
        MBEIRTrainPairs(queries, pool, hard_negatives=mined, negatives=NegativeSelection(3))
    skipped = MBEIRTrainPairs(queries, pool, hard_negatives=mined, negatives=NegativeSelection(3), on_error="skip")
    short = skipped.negative_stats["queries_with_fewer"]
    assert short > 0 and skipped.negative_stats["queries_dropped"] == short
    assert all(len(records[skipped[i]["query"]["qid"]]["negatives"]) == 4 for i in range(len(skipped)))
    topped = MBEIRTrainPairs(queries, pool, hard_negatives=mined, negatives=NegativeSelection(3, top_up=True))
    assert len(topped) == len(skipped) + short
    assert topped.negative_stats["top_up_slots_per_epoch"] == 2 * short
    for i in range(len(topped)):
        pair = topped[i]
        own = records[pair["query"]["qid"]]["negatives"]
        picked = [n["did"] for n in pair["negatives"]]
        assert len(set(picked)) == 3 and not set(picked) & set(pair["query"]["pos_cand_list"])
        assert picked[: min(3, len(own))] == own[::-1][:3]


def test_a_file_mined_with_fewer_per_query_than_the_stage_needs_is_refused(train_set, tmp_path):
    queries, pool = train_set
    mined, _ = _mined(tmp_path, queries, pool, per_query=4, top_k=2)
    with pytest.raises(ConfigError, match=r"keeps 2 negatives per query \(mine.top_k\), the stage needs 3"):
        MBEIRTrainPairs(queries, pool, hard_negatives=mined, negatives=NegativeSelection(3))
