"""M-BEIR evaluators: every row against its own pool (local) or the union of all 16 (global).

Queries and pools are encoded once into the shared cache; the global pool is the concatenation
of the local pools' cached shards (never encoded twice, never copied into one array). Under a
launcher every rank encodes its shards and rank 0 searches, scores and writes the report.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path


from umarvel import process
from umarvel.config import EvalConfig
from umarvel.data.mbeir import MBEIR, check_pools_disjoint
from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, QUERY_INSTRUCTIONS, EvalRow
from umarvel.errors import DataError, UmarvelError
from umarvel.evaluation.metrics import RowResult, evaluate_row
from umarvel.evaluation.report import run_file_name, write_report, write_run_file
from umarvel.retrieval.encode import EmbeddingCache, EncodedSet
from umarvel.retrieval.index import gpu_choice, search_ids

logger = logging.getLogger("umarvel")
POOLS = ("local", "global")


def selected_rows(names: list[str]) -> list[EvalRow]:
    unknown = [name for name in names if name not in EVAL_ROWS_BY_NAME]
    if unknown:
        raise UmarvelError(f"unknown evaluation rows {unknown}; rows are {', '.join(EVAL_ROWS_BY_NAME)}")
    return [row for row in EVAL_ROWS if not names or row.name in names]


class MBEIREvaluator:
    """Encode (cached), search and score M-BEIR rows for one embedder."""

    def __init__(self, embedder, data_root: str | os.PathLike, config: EvalConfig, *, progress: bool = True,
                 symlinks_outside_root: bool = False):
        self.config, self.progress = config, progress
        self.mbeir = MBEIR(data_root, symlinks_outside_root=symlinks_outside_root)
        self.cache = EmbeddingCache(embedder, config, progress=progress)
        self.use_gpu = gpu_choice(config.use_gpu)

    def queries(self, row: EvalRow, split: str | None = None) -> EncodedSet:
        split = split or self.config.split
        sources = [self.mbeir.path(row.query_file(split)), self.mbeir.path(QUERY_INSTRUCTIONS)]
        return self.cache.queries(f"{row.name}_{split}_queries", self.mbeir.queries(split, row), sources)

    def local_pool(self, row: EvalRow) -> EncodedSet:
        return self.cache.pool(f"{row.name}_pool", self.mbeir.local_pool(row), self.mbeir.path(row.local_pool_file()))

    def evaluate(self, rows: list[EvalRow], pools: tuple[str, ...], output_dir: str | os.PathLike) -> dict[str, list[RowResult]]:
        """Write results.json/md/csv/png and run files per pool; return the row results (rank 0)."""
        query_sets = {row.name: self.queries(row) for row in rows}
        pool_rows = EVAL_ROWS if "global" in pools else rows
        if "global" in pools:
            check_pools_disjoint([self.mbeir.local_pool(row) for row in EVAL_ROWS])
        pool_sets = {row.name: self.local_pool(row) for row in pool_rows}
        if process.rank() != 0:
            return {}
        output_dir = Path(output_dir)
        pool_sizes = {name: len(encoded) for name, encoded in pool_sets.items()}
        results = {}
        for pool in pools:
            candidates = pool_sets if pool == "local" else {"global": _concatenate(list(pool_sets.values()))}
            out = report_dir(output_dir, pool)
            results[pool] = [
                self._score_row(row, query_sets[row.name], candidates[row.name if pool == "local" else "global"], pool, out)
                for row in rows
            ]
            write_report(out, pool, results[pool], pool_sizes=pool_sizes)
        return results

    def _score_row(self, row: EvalRow, queries: EncodedSet, pool: EncodedSet, pool_name: str, out: Path) -> RowResult:
        k = max(self.config.top_k, max(row.recall_ks))
        scores, ranked_dids = self.rank(row, queries, pool, pool_name, k)
        qrels = self.mbeir.qrels(self.config.split, row)
        result = evaluate_row(row, dict(zip(queries.ids, ranked_dids)), qrels)
        write_run_file(out / run_file_name(row, pool_name), queries.ids, ranked_dids, scores.tolist(), task_id=row.task_id)
        logger.info("%s %s: %s = %.2f over %d queries", pool_name, row.name, row.headline, result.headline, result.queries)
        return result

    def rank(self, row: EvalRow, queries: EncodedSet, pool: EncodedSet, pool_name: str, k: int):
        """(scores, ranked dids) of the top k per query: the search step, which a reranking
        evaluator extends."""
        return search_ids(queries.vectors(), pool.shards, pool.ids, k, use_gpu=self.use_gpu,
                          progress=self.progress and process.is_main_process())


def report_dir(output_dir: str | os.PathLike, pool: str) -> Path:
    """Where a pool's report goes: `<output dir>/<pool>/`, however many pools are evaluated."""
    return Path(output_dir) / pool


def _concatenate(sets: list[EncodedSet]) -> EncodedSet:
    """The union pool: every local pool's shards in benchmark order; dids must be unique."""
    ids = [did for encoded in sets for did in encoded.ids]
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for did in ids:
            if did in seen:
                duplicates.append(did)
            seen.add(did)
        raise DataError(f"the local pools share dids {duplicates[:5]}: the union pool needs unique dids")
    return EncodedSet(sets[0].directory.parent, [shard for encoded in sets for shard in encoded.shards], ids)
