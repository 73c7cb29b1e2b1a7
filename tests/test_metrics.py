"""Recall as M-BEIR computes it: a hit rate per query, against hand-made rankings."""
import numpy as np
import pytest

from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME
from umarvel.errors import DataError
from umarvel.evaluation.metrics import RowResult, evaluate_row, headline_average, hit_rates
from umarvel.retrieval.index import search

RANKED = {
    "q1": ["d1", "d2", "d3", "d4", "d5", "d6"],  # positive at rank 1
    "q2": ["d9", "d8", "d7", "d3", "d5", "d6"],  # positives d3 (rank 4) and d6 (rank 6): first hit counts
    "q3": ["d1", "d2", "d3", "d4", "d5", "d6"],  # its only positive is not in the pool: always a miss
    "q4": ["d2", "d1"],  # shorter than k: the whole list is its top k
}
QRELS = {"q1": {"d1"}, "q2": {"d6", "d3"}, "q3": {"d100"}, "q4": {"d1"}}


def test_hit_rate_counts_any_positive_and_keeps_queries_without_one_in_the_denominator():
    # k=1: q1 only -> 1/4; k=2: q1, q4 -> 2/4; k=4: + q2 -> 3/4; q3 never hits.
    assert hit_rates(RANKED, QRELS, [1, 2, 4, 10]) == {1: 25.0, 2: 50.0, 4: 75.0, 10: 75.0}


def test_multiple_positives_count_once():
    ranked = {"q": ["a", "b", "c"]}
    assert hit_rates(ranked, {"q": ["a", "b", "c"]}, [1, 3]) == {1: 100.0, 3: 100.0}


def test_k_larger_than_the_pool_uses_the_whole_ranking():
    assert hit_rates({"q": ["a", "b"]}, {"q": {"b"}}, [50]) == {50: 100.0}
    assert hit_rates({"q": []}, {"q": {"b"}}, [50]) == {50: 0.0}


def test_a_tie_at_the_cutoff_is_decided_by_the_lower_candidate_index():
    # Candidates 1 and 2 score the same for the query; search puts the lower index first, so
    # whichever of them is the positive decides whether R@1 is a hit.
    candidates = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float16)
    query = np.array([[1.0, 0.0]], dtype=np.float16)
    scores, indices = search(query, candidates, 2)
    assert scores[0, 0] == scores[0, 1]
    ranked = {"q": [f"d{i}" for i in indices[0]]}
    assert ranked == {"q": ["d1", "d2"]}
    assert hit_rates(ranked, {"q": {"d1"}}, [1]) == {1: 100.0}
    assert hit_rates(ranked, {"q": {"d2"}}, [1, 2]) == {1: 0.0, 2: 100.0}


def test_a_ranked_query_without_qrels_is_an_error_not_a_silent_miss():
    with pytest.raises(DataError, match="no qrels"):
        hit_rates({"q1": ["d1"], "q9": ["d1"]}, {"q1": {"d1"}}, [1])


def test_evaluate_row_reports_the_rows_cutoffs_and_headline():
    fashion = EVAL_ROWS_BY_NAME["fashion200k_task0"]
    result = evaluate_row(fashion, RANKED, QRELS)
    assert set(result.recall) == {10, 20, 50}
    assert result.headline == result.recall[10] == 75.0
    assert result.queries == 4
    mscoco = evaluate_row(EVAL_ROWS_BY_NAME["mscoco_task0"], RANKED, QRELS)
    assert mscoco.recall == {1: 25.0, 5: 75.0, 10: 75.0}
    assert mscoco.headline == 75.0


def test_average_is_the_plain_mean_of_headlines_not_weighted_by_queries():
    results = [
        RowResult(EVAL_ROWS[0], {1: 0.0, 5: 10.0, 10: 90.0}, queries=1000),
        RowResult(EVAL_ROWS[2], {10: 40.0, 20: 0.0, 50: 0.0}, queries=1),
    ]
    assert headline_average(results) == pytest.approx(25.0)


def test_meaningless_inputs_are_errors_not_numbers():
    with pytest.raises(ValueError, match="cut-offs must be positive"):
        hit_rates(RANKED, QRELS, [0, 1])
    with pytest.raises(ValueError, match="cut-offs must be positive"):
        hit_rates(RANKED, QRELS, [])
    with pytest.raises(DataError, match="no queries to evaluate"):
        hit_rates({}, QRELS, [1])
    with pytest.raises(ValueError, match="no row results"):
        headline_average([])
