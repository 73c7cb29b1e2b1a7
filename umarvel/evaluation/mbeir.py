"""M-BEIR evaluators: every row against its own pool (local) or the union of all 16 (global).

Queries and pools are encoded once into the shared cache; the global pool is the concatenation
of the local pools' cached shards (never encoded twice, never copied into one array). Under a
launcher every rank encodes its shards and rank 0 searches, scores and writes the report.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from umarvel.config import EvalConfig
from umarvel.data.mbeir import MBEIR
from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, QUERY_INSTRUCTIONS, EvalRow
from umarvel.errors import DataError, UmarvelError
from umarvel.evaluation.metrics import RowResult, evaluate_row
from umarvel.evaluation.report import run_file_name, write_report, write_run_file
from umarvel.retrieval.encode import EncodedSet, encode_set, model_fingerprint, set_fingerprint
from umarvel.retrieval.index import search

logger = logging.getLogger("umarvel")
POOLS = ("local", "global")


def default_embedding_cache() -> Path:
    base = os.environ.get("UMARVEL_CACHE") or Path.home() / ".cache" / "umarvel"
    return Path(base) / "embeddings"


def selected_rows(names: list[str]) -> list[EvalRow]:
    unknown = [name for name in names if name not in EVAL_ROWS_BY_NAME]
    if unknown:
        raise UmarvelError(f"unknown evaluation rows {unknown}; rows are {', '.join(EVAL_ROWS_BY_NAME)}")
    return [row for row in EVAL_ROWS if not names or row.name in names]


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


class MBEIREvaluator:
    """Encode (cached), search and score M-BEIR rows for one embedder."""

    def __init__(self, embedder, data_root: str | os.PathLike, config: EvalConfig, *, progress: bool = True):
        self.embedder, self.config, self.progress = embedder, config, progress
        self.mbeir = MBEIR(data_root)
        self.model = model_fingerprint(embedder)
        self.cache = Path(config.cache_dir or default_embedding_cache()) / self.model
        self.use_gpu = {"auto": "auto", "yes": True, "no": False}[config.use_gpu]

    def _encode(self, name: str, sources: list[Path], items, count: int, id_key: str) -> EncodedSet:
        fingerprint = set_fingerprint(self.model, sources)
        return encode_set(
            self.embedder, items, count, id_key, self.cache / f"{name}-{fingerprint}",
            fingerprint=fingerprint, shard_size=self.config.shard_size, batch_size=self.config.batch_size,
            desc=f"encode {name}", progress=self.progress,
        )

    def queries(self, row: EvalRow) -> EncodedSet:
        split = self.config.split
        queries = self.mbeir.queries(split, row)
        use_instruction = self.embedder.config.prompt.use_instruction
        source = self.mbeir.path(row.query_file(split))
        return self._encode(
            f"{row.name}_{split}_queries", [source, self.mbeir.path(QUERY_INSTRUCTIONS)],
            lambda start, stop: list(queries.items(start, stop, use_instruction=use_instruction)),
            len(queries), "qid",
        )

    def local_pool(self, row: EvalRow) -> EncodedSet:
        pool = self.mbeir.local_pool(row)
        source = self.mbeir.path(row.local_pool_file())
        return self._encode(f"{row.name}_pool", [source], lambda start, stop: list(pool.items(start, stop)),
                            len(pool), "did")

    def evaluate(self, rows: list[EvalRow], pools: tuple[str, ...], output_dir: str | os.PathLike) -> dict[str, list[RowResult]]:
        """Write results.json/md/csv/png and run files per pool; return the row results (rank 0)."""
        query_sets = {row.name: self.queries(row) for row in rows}
        pool_rows = EVAL_ROWS if "global" in pools else rows
        pool_sets = {row.name: self.local_pool(row) for row in pool_rows}
        if not _is_rank_zero():
            return {}
        output_dir = Path(output_dir)
        results = {}
        for pool in pools:
            candidates = pool_sets if pool == "local" else {"global": _concatenate(list(pool_sets.values()))}
            out = output_dir / pool if len(pools) > 1 else output_dir
            results[pool] = [
                self._score_row(row, query_sets[row.name], candidates[row.name if pool == "local" else "global"], pool, out)
                for row in rows
            ]
            write_report(out, pool, results[pool])
        return results

    def _score_row(self, row: EvalRow, queries: EncodedSet, pool: EncodedSet, pool_name: str, out: Path) -> RowResult:
        k = max(self.config.top_k, max(row.recall_ks))
        scores, ranked_dids = search_scores(queries.vectors(), pool, k, use_gpu=self.use_gpu)
        qrels = self.mbeir.qrels(self.config.split, row)
        result = evaluate_row(row, dict(zip(queries.ids, ranked_dids)), qrels)
        write_run_file(out / run_file_name(row, pool_name), queries.ids, ranked_dids, scores.tolist(), task_id=row.task_id)
        logger.info("%s %s: %s = %.2f over %d queries", pool_name, row.name, row.headline, result.headline, result.queries)
        return result


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


def search_scores(queries: np.ndarray, pool: EncodedSet, k: int, use_gpu="auto") -> tuple[np.ndarray, list[list[str]]]:
    """Top-k (scores, dids) of each query against an encoded pool."""
    scores, indices = search(queries, pool.shards, k, use_gpu=use_gpu)
    return scores, [[pool.ids[i] for i in row if i >= 0] for row in indices]
