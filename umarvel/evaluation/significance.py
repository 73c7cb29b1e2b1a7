"""How sure a stage comparison is: 95% bootstrap intervals over queries, paired between stages.

The M-BEIR average is the mean over rows of each row's headline hit rate. With a few dozen
queries a row (the synthetic benchmark has 4-24), a difference of several points can be noise,
so each average gets a percentile interval from resampling every row's queries with
replacement, and a stage is said to beat the one it continued from only when the 95%
interval of the *paired* difference (the same resampled queries for both models) excludes 0.
Per-query hits come from the evaluation's run files and the benchmark's qrels, the way
trec_eval and ranx score a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umarvel.data.tasks import EVAL_ROWS, EvalRow
from umarvel.evaluation.report import run_file_name

SAMPLES = 2000
SEED = 0
# hits[row name] = 0/1 per query, queries in sorted qid order (the same for every model)
Hits = dict[str, np.ndarray]


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        low, high = plain_number(self.low, ".2f"), plain_number(self.high, ".2f")
        return f"{plain_number(self.estimate, '.2f')} [{low}, {high}]"


def plain_number(value: float, spec: str) -> str:
    """`value` formatted by `spec`, without the "-0.00" a difference of -1e-17 would print."""
    text = format(value, spec)
    return text.replace("-", "+" if "+" in spec else "", 1) if float(text) == 0 else text


def read_run(path: Path) -> dict[str, list[str]]:
    """qid -> retrieved dids in rank order, from a `qid Q0 did rank score run task` file."""
    ranked: dict[str, list[tuple[int, str]]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            qid, _, did, rank, *_ = line.split()
            ranked.setdefault(qid, []).append((int(rank), did))
    return {qid: [did for _, did in sorted(pairs)] for qid, pairs in ranked.items()}


def headline_hits(ranked: dict[str, list[str]], qrels: dict[str, set[str]], row: EvalRow) -> np.ndarray:
    """1 per query (sorted qid order) whose first relevant did is within the row's headline k."""
    return np.array([float(bool(set(ranked[qid][: row.headline_k]) & qrels.get(qid, set()))) for qid in sorted(ranked)])


def load_hits(eval_dir: Path, pool: str, qrels_of) -> Hits | None:
    """Per-query headline hits of every row evaluated in `eval_dir` for `pool` (None if no run
    files); `qrels_of(row)` gives the row's qrels."""
    hits = {}
    for directory in (eval_dir / pool, eval_dir):
        for row in EVAL_ROWS:
            path = directory / run_file_name(row, pool)
            if path.is_file() and row.name not in hits:
                hits[row.name] = headline_hits(read_run(path), qrels_of(row), row)
    return hits or None


def _resampled_rows(hits: Hits, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per row, SAMPLES x n query indices drawn with replacement."""
    return {name: rng.integers(0, len(values), size=(SAMPLES, len(values))) for name, values in hits.items()}


def _averages(hits: Hits, draws: dict[str, np.ndarray]) -> np.ndarray:
    """SAMPLES bootstrap values of the mean-over-rows average (percent)."""
    return 100 * np.mean([hits[name][draws[name]].mean(axis=1) for name in hits], axis=0)


def _interval(estimate: float, values: np.ndarray) -> Interval:
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(float(estimate), float(low), float(high))


def average_interval(hits: Hits) -> Interval:
    """The average and its 95% bootstrap interval over queries (rows resampled separately)."""
    estimate = 100 * float(np.mean([values.mean() for values in hits.values()]))
    return _interval(estimate, _averages(hits, _resampled_rows(hits, np.random.default_rng(SEED))))


def paired_difference(hits: Hits, before: Hits) -> Interval | None:
    """The average's change from `before` with the 95% interval of the paired bootstrap; None
    when the two were not evaluated on the same rows and queries."""
    if hits.keys() != before.keys() or any(len(hits[n]) != len(before[n]) for n in hits):
        return None
    draws = _resampled_rows(hits, np.random.default_rng(SEED))
    differences = _averages(hits, draws) - _averages(before, draws)
    estimate = 100 * float(np.mean([hits[n].mean() - before[n].mean() for n in hits]))
    return _interval(estimate, differences)


def verdict(difference: Interval, parent: str) -> str:
    """Words for a paired difference: better/worse only when its interval excludes 0."""
    if difference.low > 0:
        word = "improves on"
    elif difference.high < 0:
        word = "is worse than"
    else:
        word = "is within noise of"
    low, high = plain_number(difference.low, "+.2f"), plain_number(difference.high, "+.2f")
    return f"{word} {parent} ({plain_number(difference.estimate, '+.2f')}, 95% CI [{low}, {high}])"
