"""M-BEIR as an evaluator of the protocol: every row against its own pool (local) or the union
of all 16 (global).

Each pool is one Benchmark whose searches are the rows; the shared runner encodes queries and
pools once into the cache. The global pool is the union of the local pools' cached shards
(never encoded twice, never copied into one array). Under a launcher every rank encodes its
shards and rank 0 searches, scores and writes the report.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.config import EncodeConfig, MBEIREvalConfig
from umarvel.data.mbeir import MBEIR, check_pools_disjoint
from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, QUERY_INSTRUCTIONS, EvalRow
from umarvel.errors import UmarvelError
from umarvel.evaluation.metrics import RowResult, evaluate_row, headline_average
from umarvel.evaluation.protocol import Benchmark, ItemSet, Ranking, Retrieval
from umarvel.evaluation.report import run_file_name, write_report
from umarvel.evaluation.runner import Runner, Searches, ranking_of
from umarvel.retrieval.encode import EncodedSet, pool_set, query_set
from umarvel.retrieval.index import search_ids

logger = logging.getLogger("umarvel")
POOLS = ("local", "global")


def selected_rows(names: list[str]) -> list[EvalRow]:
    unknown = [name for name in names if name not in EVAL_ROWS_BY_NAME]
    if unknown:
        raise UmarvelError(f"unknown evaluation rows {unknown}; rows are {', '.join(EVAL_ROWS_BY_NAME)}")
    return [row for row in EVAL_ROWS if not names or row.name in names]


@dataclass
class RowSearch(Retrieval):
    """One M-BEIR row's search in one pool."""

    row: EvalRow | None = None
    pool: str = "local"


class MBEIRPool(Benchmark):
    """The rows against one pool; `score` keeps the row results for the M-BEIR report."""

    def __init__(self, evaluator: MBEIREvaluator, rows: list[EvalRow], pool: str, pool_sizes: dict[str, int]):
        self.evaluator, self.rows, self.pool, self.pool_sizes = evaluator, rows, pool, pool_sizes
        self.name = f"mbeir_{pool}"
        self.results: list[RowResult] = []

    def retrievals(self) -> list[Retrieval]:
        evaluator = self.evaluator
        union = ItemSet.union("global_pool", [evaluator.pool_set(row) for row in EVAL_ROWS]) if self.pool == "global" else None
        return [
            RowSearch(row.name, evaluator.query_set(row), union or evaluator.pool_set(row),
                      max(evaluator.settings.top_k, max(row.recall_ks)), run_file=run_file_name(row, self.pool),
                      task_id=row.task_id, row=row, pool=self.pool)
            for row in self.rows
        ]

    def score(self, rankings: Mapping[str, Ranking]) -> dict[str, float]:
        mbeir, split = self.evaluator.mbeir, self.evaluator.settings.split
        self.results = []
        for row in self.rows:
            result = evaluate_row(row, rankings[row.name].ids, mbeir.qrels(split, row))
            logger.info("%s %s: %s = %.2f over %d queries", self.pool, row.name, row.headline, result.headline,
                        result.queries)
            self.results.append(result)
        return {**{r.row.name: r.headline for r in self.results}, "average": headline_average(self.results)}

    def write_report(self, out_dir: Path, metrics: Mapping[str, float]) -> None:
        write_report(out_dir, self.pool, self.results, pool_sizes=self.pool_sizes)


class MBEIREvaluator:
    """Encode (cached), search and score M-BEIR rows for one embedder."""

    def __init__(self, embedder, data_root: str | os.PathLike, encode: EncodeConfig, settings: MBEIREvalConfig, *,
                 progress: bool = True, symlinks_outside_root: bool = False):
        self.encode, self.settings, self.progress = encode, settings, progress
        self.mbeir = MBEIR(data_root, symlinks_outside_root=symlinks_outside_root)
        self.use_instruction = embedder.settings.prompt.use_instruction
        self.runner = Runner(embedder, encode, progress=progress, rank=self._rank)
        self.use_gpu = self.runner.use_gpu

    def query_set(self, row: EvalRow, split: str | None = None) -> ItemSet:
        split = split or self.settings.split
        sources = [self.mbeir.path(row.query_file(split)), self.mbeir.path(QUERY_INSTRUCTIONS)]
        return query_set(f"{row.name}_{split}_queries", self.mbeir.queries(split, row), sources, self.use_instruction)

    def pool_set(self, row: EvalRow) -> ItemSet:
        return pool_set(f"{row.name}_pool", self.mbeir.local_pool(row), self.mbeir.path(row.local_pool_file()))

    def queries(self, row: EvalRow, split: str | None = None) -> EncodedSet:
        return self.runner.encode(self.query_set(row, split))

    def local_pool(self, row: EvalRow) -> EncodedSet:
        return self.runner.encode(self.pool_set(row))

    def evaluate(self, rows: list[EvalRow], pools: tuple[str, ...], output_dir: str | os.PathLike) -> dict[str, list[RowResult]]:
        """Write results.json/md/csv/png and run files per pool; return the row results (rank 0)."""
        pool_rows = EVAL_ROWS if "global" in pools else rows
        if "global" in pools:
            check_pools_disjoint([self.mbeir.local_pool(row) for row in EVAL_ROWS])
        pool_sizes = {row.name: len(self.mbeir.local_pool(row)) for row in pool_rows}
        results = {}
        for pool in pools:
            benchmark = MBEIRPool(self, rows, pool, pool_sizes)
            if self.runner.run(benchmark, report_dir(output_dir, pool)) is not None:
                results[pool] = benchmark.results
        return results

    def _rank(self, searches: Searches) -> list[Ranking]:
        split = self.settings.split
        rows = [RowQueries(search.row, split, queries, search.pool, candidates, search.k)
                for search, queries, candidates in searches]
        return [ranking_of(row.queries.ids, ranked, scores) for row, (scores, ranked) in zip(rows, self.rank(rows))]

    def rank(self, rows: list[RowQueries]) -> list[tuple[np.ndarray, list[list[str]]]]:
        """(scores, ranked dids) of the top k per query of each row: the search step, which a
        reranking evaluator extends (all rows at once, so one reranker pass scores them all)."""
        return [self.search(row, row.k) for row in rows]

    def search(self, row: RowQueries, k: int) -> tuple[np.ndarray, list[list[str]]]:
        return search_ids(row.queries.vectors(), row.pool.shards, row.pool.ids, k, use_gpu=self.use_gpu,
                          progress=self.progress and process.is_main_process())


@dataclass
class RowQueries:
    """One row's encoded queries of `split` and the pool they search (named `pool_name`), top k."""

    row: EvalRow
    split: str
    queries: EncodedSet
    pool_name: str
    pool: EncodedSet
    k: int


def report_dir(output_dir: str | os.PathLike, pool: str) -> Path:
    """Where a pool's report goes: `<output dir>/<pool>/`, however many pools are evaluated."""
    return Path(output_dir) / pool
