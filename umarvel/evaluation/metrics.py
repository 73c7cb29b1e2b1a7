"""M-BEIR recall: a hit rate per query, averaged over a row's queries, in percent.

Recall@k is 1 for a query when any of its relevant dids is among its first k retrieved, else 0
(not the fraction of positives found). Every query of the row counts in the denominator,
including queries none of whose positives is in the searched pool (OVEN/InfoSeek queries whose
positive lives in the other one's pool, in local evaluation): they score 0, as in the reference
evaluation. Any other positive outside its row's pool is refused where the qrels are read
(umarvel.data.mbeir.check_row_qrels), so it never shows up here as a silent 0. Rankings are taken as given: search breaks equal scores by the lower
candidate index (umarvel.retrieval.index), so a tie at the k-th place is decided before here.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from umarvel.data.tasks import EvalRow
from umarvel.errors import DataError


@dataclass(frozen=True)
class RowResult:
    """One evaluation row's recall (k -> percent) over `queries` queries."""

    row: EvalRow
    recall: dict[int, float]
    queries: int

    @property
    def headline(self) -> float:
        return self.recall[self.row.headline_k]


def hit_rates(
    ranked: Mapping[str, Sequence[str]], qrels: Mapping[str, Collection[str]], ks: Iterable[int]
) -> dict[int, float]:
    """Recall@k in percent for each k, over every query in `ranked`.

    `ranked` maps each of the row's qids to its retrieved dids, best first (a list shorter than
    k counts as the whole list); `qrels` maps qid -> relevant dids. A ranked qid missing from
    `qrels` means the query and qrels files disagree, which is an error, not a silent miss.
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"recall cut-offs must be positive, got {ks}")
    if not ranked:
        raise DataError("no queries to evaluate")
    missing = [qid for qid in ranked if qid not in qrels]
    if missing:
        raise DataError(
            f"{len(missing)} queries have no qrels entry (e.g. {missing[:3]}): query and qrels files do not match"
        )
    hits = dict.fromkeys(ks, 0)
    for qid, dids in ranked.items():
        relevant = set(qrels[qid])
        first_hit = next((rank for rank, did in enumerate(dids, start=1) if did in relevant), None)
        if first_hit is not None:
            for k in ks:
                hits[k] += first_hit <= k
    return {k: 100.0 * hits[k] / len(ranked) for k in ks}


def evaluate_row(row: EvalRow, ranked: Mapping[str, Sequence[str]], qrels: Mapping[str, Collection[str]]) -> RowResult:
    """The row's recall at its reported cut-offs (recall_ks, which include the headline k)."""
    ks = sorted(set(row.recall_ks) | {row.headline_k})
    return RowResult(row=row, recall=hit_rates(ranked, qrels, ks), queries=len(ranked))


def headline_average(results: Iterable[RowResult]) -> float:
    """Plain mean of the headline numbers: the paper's "Avg." when all 16 rows are given."""
    headlines = [result.headline for result in results]
    if not headlines:
        raise ValueError("no row results to average")
    return sum(headlines) / len(headlines)
