"""The zero-shot suite's metrics, as pure functions of rankings (percent, like M-BEIR's).

Rankings come from the shared search, which orders equal scores by the lower candidate index
(umarvel.retrieval.index); so a tie at the cut-off is already decided when a metric sees the
list, and every metric here is deterministic. Recall@k is the hit rate of
umarvel.evaluation.metrics.hit_rates: a query scores 1 when any of its positives is in its
first k (i2t on Flickr/COCO: an image hits when any of its five captions is in the top k).
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from umarvel.errors import DataError
from umarvel.evaluation.metrics import hit_rates

__all__ = ["average_precision_at_k", "hit_rates", "mean_average_precision", "pairwise_accuracy"]


def average_precision_at_k(ranked: Sequence[str], positives: Collection[str], k: int) -> float:
    """AP@k as CIRCO defines it: the precision at each rank <= k holding a positive, summed and
    divided by min(#positives, k) (so a query with fewer positives than k can still reach 1)."""
    if not positives:
        raise ValueError("AP needs at least one positive")
    hits = 0
    total = 0.0
    for rank, cid in enumerate(ranked[:k], start=1):
        if cid in positives:
            hits += 1
            total += hits / rank
    return total / min(len(positives), k)


def mean_average_precision(
    ranked: Mapping[str, Sequence[str]], positives: Mapping[str, Collection[str]], ks: Iterable[int]
) -> dict[int, float]:
    """mAP@k in percent for each k, over every query of `ranked`."""
    _check_queries(ranked, positives)
    return {k: 100.0 * sum(average_precision_at_k(ids, set(positives[q]), k) for q, ids in ranked.items())
            / len(ranked) for k in ks}


def pairwise_accuracy(scores: Mapping[str, Mapping[str, float]], pairs: Mapping[str, tuple[str, str]]) -> float:
    """Percent of queries whose positive scores strictly above its negative.

    `scores[q]` maps candidate id -> score for query q; `pairs[q]` is (positive id, negative id).
    A tie counts as wrong: equal scores mean the model did not tell the captions apart.
    """
    _check_queries(scores, pairs)
    right = 0
    for query, (positive, negative) in pairs.items():
        own = scores[query]
        missing = [cid for cid in (positive, negative) if cid not in own]
        if missing:
            raise DataError(f"query {query} has no score for {missing}: its gallery must hold both captions")
        right += own[positive] > own[negative]
    return 100.0 * right / len(pairs)


def _check_queries(ranked: Mapping, truth: Mapping) -> None:
    if not ranked:
        raise DataError("no queries to evaluate")
    if set(ranked) != set(truth):
        extra, missing = sorted(set(ranked) - set(truth)), sorted(set(truth) - set(ranked))
        raise DataError(f"rankings and ground truth disagree: {len(extra)} unknown queries (e.g. {extra[:3]}), "
                        f"{len(missing)} queries without a ranking (e.g. {missing[:3]})")
