"""The false-negative filter at its edge and what mining reports about it (issue 26, item 3).

A threshold >= 1 is off: no score is compared with it, so a candidate duplicating the query
whose fp32 re-normalised cosine is 1.0000001 stays a negative (Table 5's unfiltered rows). The
per-task stats count what the filter removed and give the quantiles of each query's top-1
negative score, computed here by hand.
"""
from __future__ import annotations

import numpy as np
import pytest

from umarvel.config import MineConfig
from umarvel.retrieval.mining import TaskStats, format_stats, select_negatives

DUPLICATE = float(np.float32(1.0) + np.finfo(np.float32).eps)  # 1.0000001: a re-normalised fp32 duplicate
RANKED = ["pos", "dup", "b", "c"]
SCORES = [1.0, DUPLICATE, 0.95, 0.5]


def test_threshold_one_keeps_a_duplicate_scoring_above_one():
    assert DUPLICATE > 1.0
    stats = TaskStats()
    kept, kept_scores = stats.add(RANKED, SCORES, {"pos"}, MineConfig(top_k=2, threshold=1.0), best_positive=1.0)
    assert (kept, kept_scores) == (["dup", "b"], [DUPLICATE, 0.95])
    assert (stats.filtered, stats.filtered_scores, stats.positives_removed) == (0, [], 1)


@pytest.mark.parametrize("threshold", [1.0, 1.5])
def test_threshold_at_or_above_one_compares_no_score(threshold):
    kept, _, filtered, _ = select_negatives(["x"], [float("inf")], set(), MineConfig(top_k=1, threshold=threshold), None)
    assert (kept, filtered) == (["x"], [])


def test_threshold_below_one_drops_the_duplicate_and_the_stats_count_it():
    stats = TaskStats()
    kept, kept_scores = stats.add(RANKED, SCORES, {"pos"}, MineConfig(top_k=2, threshold=0.99), best_positive=1.0)
    assert (kept, kept_scores) == (["b", "c"], [0.95, 0.5])
    summary = stats.summary()
    assert (summary["filtered"], summary["filtered_scores"]["count"]) == (1, 1)
    assert summary["filtered_scores"]["mean"] == pytest.approx(DUPLICATE)


def test_relative_filter_works_with_the_absolute_one_off():
    config = MineConfig(top_k=3, threshold=1.0, max_fraction_of_positive=0.9)
    kept, _, filtered, _ = select_negatives(["a", "b", "c"], [0.95, 0.9, 0.85], set(), config, best_positive=1.0)
    assert (kept, filtered) == (["b", "c"], [0.95])  # ceiling 0.9 x 1.0; a score at it is kept


def test_top1_negative_quantiles_by_hand():
    stats = TaskStats()
    config = MineConfig(top_k=1, threshold=0.75)
    for top1 in (0.5, 0.6, 0.7, 0.8, 0.9):  # each query's best candidate is its positive, then the top-1 negative
        stats.add(["pos", "neg", "low"], [0.99, top1, 0.1], {"pos"}, config, best_positive=0.99)
    summary = stats.summary()
    # numpy's linear quantiles over 5 values: p5 at index 0.2, p25 at 1, p50 at 2, p75 at 3, p95 at 3.8
    assert {k: round(v, 6) for k, v in summary["top1_negative_scores"].items()} == {
        "count": 5, "mean": 0.7, "p5": 0.52, "p25": 0.6, "p50": 0.7, "p75": 0.8, "p95": 0.88}
    assert summary["filtered"] == 2  # 0.8 and 0.9 are above 0.75


def _table(config: MineConfig, stats: TaskStats) -> list[str]:
    params = {"top_k": config.top_k, "threshold": config.threshold,
              "max_fraction_of_positive": config.max_fraction_of_positive}
    return format_stats({"params": params, "tasks": {"9:task0": stats.summary()}}).splitlines()


def test_format_stats_prints_top1_quantiles_and_says_when_the_filter_is_off():
    config = MineConfig(top_k=2, threshold=1.0)
    stats = TaskStats()
    stats.add(RANKED, SCORES, {"pos"}, config, best_positive=1.0)
    lines = _table(config, stats)
    assert lines[0].endswith("top-1 neg p5/p50/p95")
    assert lines[1].split() == ["mscoco", "task0", "1", "0", "0", "0.975", "-", "1.000/1.000/1.000"]
    assert ("filtered: filter off (mine.threshold = 1.0 >= 1, mine.max_fraction_of_positive = 0.0): "
            "no candidate dropped as a likely false negative;") in lines


def test_format_stats_names_both_filters_when_on():
    config = MineConfig(top_k=2, threshold=0.95, max_fraction_of_positive=0.9)
    lines = _table(config, TaskStats())
    assert ("filtered: candidates dropped as likely false negatives (cosine above mine.threshold = 0.95 or above "
            "mine.max_fraction_of_positive = 0.9 of the query's best positive);") in lines
