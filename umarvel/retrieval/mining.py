"""Filtered hard-negative mining (paper 3.2.2, Finding 5).

For each training query: rank the pool with the stage-1 model, remove every positive of the
query, remove candidates scoring above the filter (likely false negatives: an absolute
threshold and, optionally, a fraction of the query's best positive score), keep the top k.
A threshold >= 1 is off: no score is compared with it at all, so an fp32 duplicate of a
candidate whose re-normalised cosine is 1.0000001 is kept, as the paper's unfiltered rows
(Table 5, ID-0 and ID-1) need. The stats say per task how many candidates the filter removed
and where each query's top-1 negative scores, so a user sees whether a threshold bites.
Encoding goes through the shared embedding cache (resumable, sharded across ranks); search is
the evaluator's exact FAISS search.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.config import EncodeConfig, MineConfig
from umarvel.data.mbeir import MBEIR, mbeir_root, open_pool, open_queries
from umarvel.data.sources import write_hard_negatives
from umarvel.data.tasks import DATASETS, GLOBAL_POOL, QUERY_INSTRUCTIONS, TASKS, UNION_TRAIN_QUERIES
from umarvel.errors import UmarvelError
from umarvel.io import atomic_write_json
from umarvel.retrieval.encode import EmbeddingCache, EncodedSet
from umarvel.retrieval.index import gpu_choice, search_ids

logger = logging.getLogger("umarvel")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class TaskStats:
    """What the filter did for one (dataset, task): counts and score distributions."""

    queries: int = 0
    short_queries: int = 0
    positives_removed: int = 0
    filtered: int = 0
    kept_scores: list[float] = field(default_factory=list)
    filtered_scores: list[float] = field(default_factory=list)
    top1_negative_scores: list[float] = field(default_factory=list)

    def add(self, ranked: list[str], scores: list[float], positives: set[str], config: MineConfig,
            best_positive: float | None) -> tuple[list[str], list[float]]:
        """Select one query's negatives (`select_negatives`), count what the filter did; return
        the kept dids and their scores."""
        kept, kept_scores, filtered_scores, removed = select_negatives(ranked, scores, positives, config, best_positive)
        self.queries += 1
        self.short_queries += len(kept) < config.top_k
        self.positives_removed += removed
        self.filtered += len(filtered_scores)
        self.kept_scores.extend(kept_scores)
        self.filtered_scores.extend(filtered_scores)
        top1 = next((score for did, score in zip(ranked, scores) if did not in positives), None)
        if top1 is not None:
            self.top1_negative_scores.append(top1)
        return kept, kept_scores

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.endswith("_scores")}
        for name in ("kept_scores", "filtered_scores", "top1_negative_scores"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            out[name] = (
                {"count": int(values.size), "mean": float(values.mean()),
                 **{f"p{int(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}}
                if values.size else {"count": 0}
            )
        return out


def select_negatives(
    ranked: list[str], scores: list[float], positives: set[str], config: MineConfig, best_positive: float | None
) -> tuple[list[str], list[float], list[float], int]:
    """(kept dids, kept scores, filtered scores, positives removed) for one query's ranking.

    The ceiling is the absolute threshold when it is below 1 (>= 1 is off, never compared:
    cosines of fp32 duplicates exceed 1 by rounding), lowered to the fraction of the best
    positive when that is on; with neither, nothing is filtered.
    """
    ceilings = [config.threshold] if config.threshold < 1 else []
    if config.max_fraction_of_positive > 0 and best_positive is not None:
        ceilings.append(config.max_fraction_of_positive * best_positive)
    ceiling = min(ceilings, default=None)
    kept, kept_scores, filtered_scores, removed = [], [], [], 0
    for did, score in zip(ranked, scores):
        if did in positives:
            removed += 1
        elif ceiling is not None and score > ceiling:
            filtered_scores.append(score)
        elif len(kept) < config.top_k:
            kept.append(did)
            kept_scores.append(score)
    return kept, kept_scores, filtered_scores, removed


def _best_positive(query_vector: np.ndarray, positives: list[str], pool: EncodedSet, row_of: dict[str, int]) -> float | None:
    rows = [row_of[did] for did in positives if did in row_of]
    if not rows:
        return None
    vectors = np.stack([pool.row(r) for r in rows]).astype(np.float32)
    return float((vectors @ query_vector.astype(np.float32)).max())


def _groups(records: list[dict], scope: str) -> dict[tuple, list[int]]:
    """Query rows by search group: one group for the union pool, else (dataset, task)."""
    groups = defaultdict(list)
    for index, record in enumerate(records):
        key = ("union",) if scope == "union" else (record["qid"].split(":")[0], record["task_id"])
        groups[key].append(index)
    return groups


def _candidate_rows(pool: EncodedSet, modality_of: list[str], key: tuple) -> np.ndarray | None:
    if key == ("union",):
        return None
    dataset, task_id = key
    wanted = TASKS[task_id][1]
    return np.array([i for i, did in enumerate(pool.ids) if did.split(":")[0] == dataset and modality_of[i] == wanted])


def mine(embedder, data_root: str | os.PathLike, out: str | os.PathLike, mine_config: MineConfig,
         encode_config: EncodeConfig, *, progress: bool = True, symlinks_outside_root: bool = False) -> dict:
    """Mine, write the hard-negative file (+ `<out>.stats.json`) atomically; return the stats."""
    root = mbeir_root(data_root)
    instructions = MBEIR(root).instructions
    query_file = root / (mine_config.queries or UNION_TRAIN_QUERIES)
    pool_file = root / (mine_config.pool or GLOBAL_POOL.format(split="train"))
    queries = open_queries(query_file, root, instructions, upsampled=True, symlinks_outside_root=symlinks_outside_root)
    pool_table = open_pool(pool_file, root, symlinks_outside_root=symlinks_outside_root)
    cache = EmbeddingCache(embedder, encode_config, progress=progress)
    encoded_queries = cache.queries(f"mine_{query_file.stem}", queries, [query_file, root / QUERY_INSTRUCTIONS])
    encoded_pool = cache.pool(f"mine_{pool_file.stem}", pool_table, pool_file)
    if process.rank() != 0:
        return {}

    records, first_row = [], {}
    for index in range(len(queries)):
        record = queries.record(index)
        if record["qid"] not in first_row:
            first_row[record["qid"]] = index
            records.append(record)
    query_vectors = encoded_queries.vectors()
    row_of_query = {qid: i for i, qid in enumerate(encoded_queries.ids)}
    row_of_did = {did: i for i, did in enumerate(encoded_pool.ids)}
    modality_of = pool_table.table.column("modality").to_pylist() if mine_config.scope == "task" else []

    stats: dict[str, TaskStats] = defaultdict(TaskStats)
    mined: dict[str, dict] = {}
    for key, members in _groups(records, mine_config.scope).items():
        subset = _candidate_rows(encoded_pool, modality_of, key)
        if subset is not None and subset.size == 0:
            raise UmarvelError(f"no candidate of dataset {key[0]} with task {key[1]}'s modality in {pool_file}")
        candidates = encoded_pool.shards if subset is None else np.stack([encoded_pool.row(i) for i in subset])
        ids = encoded_pool.ids if subset is None else [encoded_pool.ids[i] for i in subset]
        vectors = query_vectors[[row_of_query[records[m]["qid"]] for m in members]]
        scores, ranked = search_ids(vectors, candidates, ids, mine_config.depth, use_gpu=gpu_choice(encode_config.use_gpu),
                                    progress=progress)
        for vector, member, row_scores, row_ranked in zip(vectors, members, scores.tolist(), ranked):
            record = records[member]
            positives = list(record["pos_cand_list"])
            best = _best_positive(vector, positives, encoded_pool, row_of_did)
            task = stats[f"{record['qid'].split(':')[0]}:task{record['task_id']}"]
            kept, kept_scores = task.add(row_ranked, row_scores, set(positives), mine_config, best)
            mined[record["qid"]] = {"qid": record["qid"], "negatives": kept, "scores": kept_scores}

    params = {**asdict(mine_config), "queries": str(query_file), "pool": str(pool_file)}
    write_hard_negatives(out, (mined[r["qid"]] for r in records), model=cache.model, params=params)
    summary = {"params": params, "model": cache.model, "tasks": {k: v.summary() for k, v in sorted(stats.items())}}
    atomic_write_json(Path(f"{out}.stats.json"), summary)
    return summary


def filter_description(params: dict) -> str:
    """What the filter dropped, in words, from the mining params (threshold >= 1 is off)."""
    rules = []
    if params["threshold"] < 1:
        rules.append(f"cosine above mine.threshold = {params['threshold']}")
    if params["max_fraction_of_positive"] > 0:
        rules.append(f"above mine.max_fraction_of_positive = {params['max_fraction_of_positive']} of the query's "
                     "best positive")
    if not rules:
        return (f"filter off (mine.threshold = {params['threshold']} >= 1, mine.max_fraction_of_positive = "
                f"{params['max_fraction_of_positive']}): no candidate dropped as a likely false negative")
    return "candidates dropped as likely false negatives (" + " or ".join(rules) + ")"


def format_stats(summary: dict) -> str:
    """A table of the filter's effect per (dataset, task), with a legend, for the terminal.

    The top-1 negative quantiles show where a threshold sits: one below their p5 filters
    (nearly) every query's best negative, one above their p95 (nearly) nothing.
    """
    params = summary["params"]
    lines = [f"{'dataset task':20s} {'queries':>8s} {'short':>6s} {'filtered':>9s} {'kept mean':>10s} "
             f"{'filtered mean':>14s} {'top-1 neg p5/p50/p95':>22s}"]
    for key, s in summary["tasks"].items():
        dataset_id, task = key.split(":")
        kept, filtered = (f"{s[name]['mean']:.3f}" if s[name]["count"] else "-" for name in ("kept_scores", "filtered_scores"))
        top1 = s["top1_negative_scores"]
        top1 = f"{top1['p5']:.3f}/{top1['p50']:.3f}/{top1['p95']:.3f}" if top1["count"] else "-"
        lines.append(
            f"{DATASETS[int(dataset_id)] + ' ' + task:20s} {s['queries']:8d} {s['short_queries']:6d} {s['filtered']:9d} "
            f"{kept:>10s} {filtered:>14s} {top1:>22s}"
        )
    lines += [
        "",
        "queries: training queries mined; "
        f"short: queries left with fewer than mine.top_k = {params['top_k']} negatives;",
        f"filtered: {filter_description(params)};",
        "kept mean / filtered mean: mean cosine of the kept negatives / of the dropped candidates;",
        "top-1 neg: quantiles of each query's best-scoring non-positive candidate before the filter "
        "(a threshold below p5 drops nearly every query's best negative, one above p95 nearly none).",
    ]
    return "\n".join(lines)
