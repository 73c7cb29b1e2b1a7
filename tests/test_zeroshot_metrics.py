"""Zero-shot metrics against hand-computed rankings, and every task's score on rankings built by hand."""
from __future__ import annotations

import pytest
from zeroshot_fixtures import WRITERS

from umarvel.errors import DataError
from umarvel.evaluation.protocol import Ranking
from umarvel.evaluation.zeroshot import TASKS
from umarvel.evaluation.zeroshot.metrics import (
    average_precision_at_k,
    hit_rates,
    mean_average_precision,
    pairwise_accuracy,
)


def test_ap_at_k_by_hand():
    # hits at ranks 1 and 3 of 2 positives: (1/1 + 2/3) / 2
    assert average_precision_at_k(["a", "x", "b", "y"], {"a", "b"}, 5) == pytest.approx((1 + 2 / 3) / 2)
    # fewer positives than k: divided by #positives (1), not k, so a first-rank hit is perfect
    assert average_precision_at_k(["a", "x", "y"], {"a"}, 50) == 1.0
    # a positive beyond k does not count; more positives than k divides by k
    assert average_precision_at_k(["x", "a", "b", "c"], {"a", "b", "c"}, 2) == pytest.approx((1 / 2) / 2)
    assert average_precision_at_k(["x", "y"], {"a"}, 2) == 0.0


def test_map_over_queries_and_ks():
    ranked = {"q1": ["a", "x", "b"], "q2": ["y", "c"]}
    positives = {"q1": {"a", "b"}, "q2": {"c"}}
    result = mean_average_precision(ranked, positives, [1, 3])
    assert result[1] == pytest.approx(100 * (1.0 + 0.0) / 2)  # q1 hit at 1 (min(2,1)=1); q2 misses at 1
    assert result[3] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_ties_follow_the_search_order():
    """Equal scores are ordered by lower candidate index by the search; the metric takes that order."""
    ranking = Ranking(ids={"q": ["c0", "c1"]}, scores={"q": [0.5, 0.5]})
    assert hit_rates(ranking.ids, {"q": {"c1"}}, [1])[1] == 0.0
    assert hit_rates(ranking.ids, {"q": {"c0"}}, [1])[1] == 100.0


def test_pairwise_accuracy_strict():
    scores = {"a": {"p": 0.9, "n": 0.1}, "b": {"p": 0.2, "n": 0.3}, "c": {"p": 0.4, "n": 0.4}}
    pairs = {q: ("p", "n") for q in scores}
    assert pairwise_accuracy(scores, pairs) == pytest.approx(100 / 3)  # the tie (c) counts as wrong
    with pytest.raises(DataError, match="no score"):
        pairwise_accuracy({"a": {"p": 1.0}}, {"a": ("p", "n")})


def test_map_refuses_disagreeing_queries():
    with pytest.raises(DataError, match="disagree"):
        mean_average_precision({"q1": ["a"]}, {"q2": {"a"}}, [5])


def _rank_best_first(retrieval, wanted: dict[str, list[str]]) -> Ranking:
    """A ranking where each query's `wanted` ids come first, then the rest of its gallery in order."""
    ids, scores = {}, {}
    for query in retrieval.queries.ids:
        gallery = list(retrieval.galleries[query]) if retrieval.galleries else list(retrieval.candidates.ids)
        first = [c for c in wanted.get(query, []) if c in gallery]
        order = (first + [c for c in gallery if c not in first])[: retrieval.k]
        ids[query] = order
        scores[query] = [float(len(order) - i) for i in range(len(order))]
    return Ranking(ids=ids, scores=scores)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    for writer in WRITERS.values():
        writer(root)
    return root


def test_caption_retrieval_scores(fixture_root):
    flickr = TASKS["flickr"](fixture_root, None)
    t2i, i2t = flickr.retrievals()
    # captions 0-4 belong to image 0: caption c0 ranks image 1 first, then image 0 (hit at 2);
    # every other caption ranks its own image first
    wanted_t2i = {cid: [str(int(cid[1:]) // 5)] for cid in t2i.queries.ids}
    wanted_t2i["c0"] = ["1", "0"]
    # image 2 ranks the captions of image 0 first (none of its own in the top 5), the rest find their own
    wanted_i2t = {iid: [f"c{5 * int(iid) + j}" for j in range(5)] for iid in i2t.queries.ids}
    wanted_i2t["2"] = [f"c{j}" for j in range(5)] + ["c10"]
    result = flickr.score({"t2i": _rank_best_first(t2i, wanted_t2i), "i2t": _rank_best_first(i2t, wanted_i2t)})
    assert result["t2i_R@1"] == pytest.approx(100 * 14 / 15)
    assert result["t2i_R@5"] == 100.0
    assert result["i2t_R@1"] == pytest.approx(200 / 3)
    assert result["i2t_R@5"] == pytest.approx(200 / 3)
    assert result["i2t_R@10"] == 100.0  # c10 (image 2's) at rank 6


def test_circo_map(fixture_root):
    circo = TASKS["circo"](fixture_root, None)
    (search,) = circo.retrievals()
    # query 0 (gt 101, 103): 101 first, 103 at rank 6; query 1 (gt 104): 104 at rank 2
    ranking = _rank_best_first(search, {"0": ["101", "100", "102", "104", "105", "103"], "1": ["100", "104"]})
    result = circo.score({"cir": ranking})
    assert result["mAP@5"] == pytest.approx(100 * ((1 / 1) / 2 + (1 / 2) / 1) / 2)
    assert result["mAP@10"] == pytest.approx(100 * ((1 + 2 / 6) / 2 + 1 / 2) / 2)


def test_genecis_per_task_and_mean(fixture_root):
    genecis = TASKS["genecis"](fixture_root, None)
    searches = genecis.retrievals()
    rankings = {}
    for search in searches:
        gallery = search.galleries
        wanted = {q: list(gallery[q]) for q in search.queries.ids}  # target first: every query hits
        if search.name == "change_object":
            q = search.queries.ids[0]
            wanted[q] = [gallery[q][1], gallery[q][2], gallery[q][0]]  # target third
        rankings[search.name] = _rank_best_first(search, wanted)
        assert all(set(rankings[search.name].ids[q]) <= set(gallery[q]) for q in search.queries.ids)
    result = genecis.score(rankings)
    assert result["change_object_R@1"] == 50.0 and result["change_object_R@2"] == 50.0
    assert result["change_object_R@3"] == 100.0
    assert result["focus_attribute_R@1"] == 100.0
    assert result["R@1"] == pytest.approx((50 + 100 + 100 + 100) / 4)


def test_pairwise_tasks_score_from_ranking_scores(fixture_root):
    ccneg = TASKS["ccneg"](fixture_root, None)
    (search,) = ccneg.retrievals()
    ids, scores = {}, {}
    for n, q in enumerate(search.queries.ids):
        ids[q] = [f"{q}:pos", f"{q}:neg"]
        scores[q] = [0.5, 0.5] if n == 2 else [0.9, 0.1] if n == 0 else [0.2, 0.1]
    ids["r1"] = ["r1:neg", "r1:pos"]  # r1: negative scores higher
    scores["r1"] = [0.8, 0.3]
    assert ccneg.score({"itm": Ranking(ids, scores)})["acc"] == pytest.approx(100 / 3)

    sugar = TASKS["sugar_crepe"](fixture_root, None)
    rankings = {}
    for search in sugar.retrievals():
        right = search.name != "swap_obj"
        rankings[search.name] = Ranking(
            ids={q: [f"{q}:pos", f"{q}:neg"] for q in search.queries.ids},
            scores={q: [1.0, 0.0] if right else [0.0, 1.0] for q in search.queries.ids})
    result = sugar.score(rankings)
    assert result["swap_obj_acc"] == 0.0 and result["add_att_acc"] == 100.0
    assert result["acc"] == pytest.approx(600 / 7)


@pytest.mark.parametrize("task", ["visdial", "fashioniq_multiturn", "msrvtt", "msvd", "sharegpt4v", "urban1k",
                                  "mscoco"])
def test_perfect_and_missed_rankings(fixture_root, task):
    """Single-positive tasks: R@k is 100 for rankings that put each target first, and drops by one
    query's share when one query's target is pushed out of every cut-off."""
    benchmark = TASKS[task](fixture_root, None)
    perfect, worst = {}, {}
    truth = _targets(benchmark)
    for search in benchmark.retrievals():
        wanted = {q: sorted(truth[search.name][q]) for q in search.queries.ids}
        perfect[search.name] = _rank_best_first(search, wanted)
        first = search.queries.ids[0]
        others = [c for c in search.candidates.ids if c not in truth[search.name][first]]
        missed = dict(wanted, **{first: others})
        ranking = _rank_best_first(search, missed)
        ranking.ids[first] = [c for c in ranking.ids[first] if c not in truth[search.name][first]]
        worst[search.name] = ranking
    assert set(benchmark.score(perfect).values()) == {100.0}
    drop = benchmark.score(worst)
    for search in benchmark.retrievals():
        share = 100.0 * (len(search.queries) - 1) / len(search.queries)
        keys = [key for key in drop if key.startswith(f"{search.name}_") or "_" not in key]
        assert keys and all(drop[key] == pytest.approx(share) for key in keys)


def _targets(benchmark) -> dict[str, dict[str, set[str]]]:
    """search -> query -> positive candidate ids, from the reader's pairing."""
    name = benchmark.name
    if name in ("sharegpt4v", "urban1k", "mscoco", "flickr"):
        captions_of: dict[str, set[str]] = {}
        for cid, _, iid in benchmark.captions:
            captions_of.setdefault(iid, set()).add(cid)
        return {"t2i": {cid: {iid} for cid, _, iid in benchmark.captions}, "i2t": captions_of}
    if name == "visdial":
        return {"dialog2i": {f"d{iid}": {iid} for iid, _, _ in benchmark.dialogs}}
    if name == "fashioniq_multiturn":
        return {"multiturn": {qid: {target} for qid, _, _, target in benchmark.queries}}
    return {"t2v": {qid: {vid} for qid, _, vid in benchmark.captions}}
