"""U-MARVEL+ evaluation: the embedder's top-K per query re-scored by the reranker and fused,
S = a * S_recall + (1 - a) * S_rerank (paper 3.3).

The fusion weight is either given or, with alpha="auto", chosen per pool on the VALIDATION
queries: every a of the grid is tried on the val queries' reranked top-K and the one with the
best average headline recall wins (ties go to the larger a, the one leaning more on the
recall model). Test qrels are never read before a is fixed; the reference code tuned a on
test recall. The choice and the grid's val averages are written into results.json.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

from umarvel import process
from umarvel.config import EncodeConfig, MBEIREvalConfig
from umarvel.data.tasks import EVAL_ROWS, EvalRow
from umarvel.errors import DataError
from umarvel.evaluation.mbeir import MBEIREvaluator, report_dir
from umarvel.evaluation.metrics import RowResult, evaluate_row
from umarvel.evaluation.report import RESULTS_JSON, RESULTS_MD
from umarvel.io import atomic_write_json, atomic_write_text
from umarvel.retrieval.encode import EncodedSet, concatenate
from umarvel.retrieval.rerank import fused_rankings, rerank_candidates

ALPHA_GRID = tuple(i / 10 for i in range(11))
VALIDATION = "val"


class PoolUnion:
    """Candidate lookup by did across several pools (the global pool is the union of the 16)."""

    def __init__(self, pools):
        self.pools = pools

    def get(self, did: str) -> dict:
        for pool in self.pools:
            if did in pool:
                return pool.get(did)
        raise DataError(f"did '{did}' is in none of the local pools")


class RerankingEvaluator(MBEIREvaluator):
    """MBEIREvaluator whose ranking step re-scores each query's top-K with a reranker."""

    def __init__(self, embedder, reranker, data_root: str | os.PathLike, encode: EncodeConfig,
                 settings: MBEIREvalConfig, *, top_k: int, alpha: float | str = "auto",
                 grid: tuple[float, ...] = ALPHA_GRID, progress: bool = True, symlinks_outside_root: bool = False):
        super().__init__(embedder, data_root, encode, settings, progress=progress,
                         symlinks_outside_root=symlinks_outside_root)
        if top_k < 1:
            raise ValueError(f"the reranked top-k must be positive, got {top_k}")
        if alpha != "auto" and not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be 'auto' or a number in [0, 1], got {alpha!r}")
        self.reranker, self.top_k, self.alpha, self.grid, self.progress = reranker, top_k, alpha, grid, progress
        self.alphas: dict[str, float] = {}

    def evaluate(self, rows: list[EvalRow], pools: tuple[str, ...], output_dir: str | os.PathLike) -> dict[str, list[RowResult]]:
        """Choose (or take) a per pool, then evaluate as MBEIREvaluator and record a in the reports."""
        validation = {pool: self.choose_alpha(rows, pool) for pool in pools} if self.alpha == "auto" else {}
        if process.rank() != 0:
            return super().evaluate(rows, pools, output_dir)
        self.alphas = {pool: validation[pool][0] if validation else float(self.alpha) for pool in pools}
        results = super().evaluate(rows, pools, output_dir)
        for pool in pools:
            block = {
                "alpha": self.alphas[pool],
                "chosen_on": VALIDATION if validation else "given",
                "top_k": self.top_k,
                "model": str(self.reranker.source),
            }
            if validation:
                block["val_average_by_alpha"] = validation[pool][1]
            _record_rerank(report_dir(output_dir, pool), block)
        return results

    def rank(self, row: EvalRow, queries: EncodedSet, pool: EncodedSet, pool_name: str, k: int):
        scores, ranked = super().rank(row, queries, pool, pool_name, max(k, self.top_k))
        reranked = self.rerank_scores(row, self.settings.split, queries.ids, ranked, pool_name)
        return fused_rankings(scores, ranked, reranked, self.alphas[pool_name])

    def choose_alpha(self, rows: list[EvalRow], pool_name: str) -> tuple[float, dict[str, float]] | None:
        """(a, {a: val average headline}) for one pool, from the val queries only (rank 0;
        the other ranks help encode and get None)."""
        queries = {row.name: self.queries(row, split=VALIDATION) for row in rows}
        local = {row.name: self.local_pool(row) for row in (EVAL_ROWS if pool_name == "global" else rows)}
        if process.rank() != 0:
            return None
        union = concatenate(list(local.values())) if pool_name == "global" else None
        averages = dict.fromkeys(self.grid, 0.0)
        for row in rows:
            encoded = queries[row.name]
            k = max(self.settings.top_k, max(row.recall_ks), self.top_k)
            scores, ranked = super().rank(row, encoded, local[row.name] if union is None else union, pool_name, k)
            reranked = self.rerank_scores(row, VALIDATION, encoded.ids, ranked, pool_name)
            qrels = self.mbeir.qrels(VALIDATION, row)
            for alpha in self.grid:
                _, fused = fused_rankings(scores, ranked, reranked, alpha)
                averages[alpha] += evaluate_row(row, dict(zip(encoded.ids, fused)), qrels).headline / len(rows)
        best = max(averages.values())
        chosen = max(alpha for alpha, average in averages.items() if average == best)
        return chosen, {f"{alpha:.2f}": round(average, 4) for alpha, average in averages.items()}

    def rerank_scores(self, row: EvalRow, split: str, qids: list[str], ranked: list[list[str]],
                      pool_name: str) -> list[list[float]]:
        """P(YES) of each query of `row` with its first top_k candidates."""
        queries = self.mbeir.queries(split, row)
        candidates = self.union_pool if pool_name == "global" else self.mbeir.local_pool(row)
        use_instruction = self.reranker.settings.prompt.use_instruction
        query_items = [queries.item(queries.find(qid), use_instruction=use_instruction) for qid in qids]
        candidate_items = [[candidates.get(did) for did in dids[: self.top_k]] for dids in ranked]
        return rerank_candidates(self.reranker, query_items, candidate_items, batch_size=self.encode.batch_size,
                                 num_workers=self.encode.num_workers, progress=self.progress)

    @cached_property
    def union_pool(self) -> PoolUnion:
        return PoolUnion([self.mbeir.local_pool(row) for row in EVAL_ROWS])


def _record_rerank(out_dir: Path, block: dict) -> None:
    """Add the reranking settings to a written report: results.json's "rerank", a line in results.md."""
    results = json.loads((out_dir / RESULTS_JSON).read_text())
    results["rerank"] = block
    atomic_write_json(out_dir / RESULTS_JSON, results)
    how = f"chosen on the {VALIDATION} queries" if block["chosen_on"] == VALIDATION else "given"
    line = (f"\nU-MARVEL+: each query's top {block['top_k']} re-scored by the reranker {block['model']}, "
            f"S = a*S_recall + (1-a)*S_rerank with a = {block['alpha']:.2f} ({how}).\n")
    atomic_write_text(out_dir / RESULTS_MD, (out_dir / RESULTS_MD).read_text() + line)
