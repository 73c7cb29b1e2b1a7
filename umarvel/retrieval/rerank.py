"""Retrieval around the reranker (paper 3.3): its training pairs from a recall model's top-N,
and U-MARVEL+, the recall ranking re-scored by the reranker and fused:

    S = a * S_recall + (1 - a) * S_rerank        S_recall: cosine, S_rerank: P(YES)

Pairs per training query: one positive (drawn by the seed among the query's positives in the
pool) answered YES, and NO pairs from the recall model's top-N minus every positive of the
query; all of them (the paper: a positive and the top 50) or `negatives_per_positive` drawn
by the seed. Encoding goes through the shared embedding cache, search through the
evaluator's exact FAISS search, as in mining.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.config import EncodeConfig, RerankConfig
from umarvel.data.mbeir import CandidatePool, Queries
from umarvel.data.rerank import RerankPair
from umarvel.retrieval.encode import EmbeddingCache, query_set
from umarvel.retrieval.index import gpu_choice, search_ids

logger = logging.getLogger("umarvel")


def select_pairs(qid: str, ranked: list[str], positives: list[str], negatives_per_positive: int,
                 seed: int) -> list[RerankPair]:
    """One query's pairs: a YES for one of `positives` (the query's positives in the pool) and
    NOs from `ranked` without any positive, in ranked order; the same for the same seed."""
    rng = random.Random(f"{seed}:{qid}")
    is_positive = set(positives)
    negatives = [did for did in ranked if did not in is_positive]
    if negatives_per_positive:
        kept = sorted(rng.sample(range(len(negatives)), min(negatives_per_positive, len(negatives))))
        negatives = [negatives[i] for i in kept]
    return [RerankPair(qid, rng.choice(positives), "YES")] + [RerankPair(qid, did, "NO") for did in negatives]


def first_rows(queries: Queries) -> list[int]:
    """The first row of every qid (the union train file repeats small datasets' queries)."""
    first: dict[str, int] = {}
    for row, qid in enumerate(queries.table.column("qid").to_pylist()):
        first.setdefault(qid, row)
    return list(first.values())


def recall_training_pairs(embedder, queries: Queries, pool: CandidatePool, config: RerankConfig,
                          encode_config: EncodeConfig, *, seed: int, progress: bool = True) -> tuple[list[RerankPair], dict]:
    """(pairs, statistics) from the embedder's top-N in `pool` for the training queries.

    Every rank of a launched job must call this (each encodes its shards); rank 0 searches
    and returns the pairs, the others return ([], {}).
    """
    rows = first_rows(queries)
    if config.max_queries and config.max_queries < len(rows):
        rows = sorted(random.Random(seed).sample(rows, config.max_queries))
    sample = f"_sample{len(rows)}_seed{seed}" if config.max_queries else ""
    use_instruction = embedder.settings.prompt.use_instruction
    sources = [queries.file] + ([queries.instructions.file] if queries.instructions else [])
    cache = EmbeddingCache(embedder, encode_config, progress=progress)
    name = f"rerank_{Path(queries.file).stem}{sample}"
    encoded_queries = cache.encode(query_set(name, queries, sources, use_instruction, rows))
    # The set name mining gives the pool, so a pool encoded for mining is re-used here.
    encoded_pool = cache.pool(f"mine_{Path(pool.file).stem}", pool, pool.file)
    if process.rank() != 0:
        return [], {}
    _, ranked = search_ids(encoded_queries.vectors(), encoded_pool.shards, encoded_pool.ids, config.top_n,
                           use_gpu=gpu_choice(encode_config.use_gpu), progress=progress)
    pairs, skipped = [], []
    for row, row_ranked in zip(rows, ranked):
        record = queries.record(row)
        positives = [did for did in record["pos_cand_list"] if did in pool]
        if not positives:
            skipped.append(record["qid"])
            continue
        pairs.extend(select_pairs(record["qid"], row_ranked, positives, config.negatives_per_positive, seed))
    if skipped:
        logger.warning("%d training queries have no positive in %s and give no pairs (e.g. %s)",
                       len(skipped), pool.file, skipped[:3])
    yes = sum(pair.answer == "YES" for pair in pairs)
    stats = {"recall_fingerprint": cache.model, "queries": len(rows) - len(skipped), "skipped_queries": len(skipped), "yes": yes,
             "no": len(pairs) - yes}
    return pairs, stats


def fuse(recall, rerank, alpha: float):
    """S = a * S_recall + (1 - a) * S_rerank (paper 3.3); numbers or arrays."""
    return alpha * recall + (1 - alpha) * rerank


def fused_rankings(recall_scores: np.ndarray, ranked: list[list[str]], rerank_scores: list[list[float]],
                   alpha: float) -> tuple[np.ndarray, list[list[str]]]:
    """Every query's ranking re-ordered by S: (scores, dids), best first.

    Query i's first len(rerank_scores[i]) candidates carry a reranker score; the rest, which
    the reranker did not see, take S_rerank = 0. Since P(YES) >= 0 and recall scores fall
    down a ranking, they stay below every reranked candidate, in their recall order.
    Equal S keep the recall order.
    """
    out_scores, out_ranked = np.zeros_like(recall_scores, dtype=np.float32), []
    for i, (dids, reranked) in enumerate(zip(ranked, rerank_scores)):
        recall = recall_scores[i, : len(dids)].astype(np.float64)
        rerank = np.zeros_like(recall)
        rerank[: len(reranked)] = reranked
        fused = fuse(recall, rerank, alpha)
        order = np.argsort(-fused, kind="stable")
        out_scores[i, : len(dids)] = fused[order]
        out_ranked.append([dids[j] for j in order])
    return out_scores, out_ranked


def rerank_candidates(reranker, queries: list[dict], candidates: list[list[dict]], *, batch_size: int,
                      num_workers: int | None = None, progress: bool = False) -> list[list[float]]:
    """P(YES) of each query with each of its candidates, as one list per query."""
    pairs = [(query, candidate) for query, own in zip(queries, candidates) for candidate in own]
    flat = reranker.score(pairs, batch_size=batch_size, show_progress=progress, num_workers=num_workers).tolist()
    out, start = [], 0
    for own in candidates:
        out.append(flat[start : start + len(own)])
        start += len(own)
    return out


def rerank_searches(reranker, searches: list[tuple[list[dict], list[list[dict]]]], **settings) -> list[list[list[float]]]:
    """`rerank_candidates` for several searches' (queries, their candidates) in one reranker pass
    (one set of input workers, full batches); one list of per-query scores per search."""
    scores = rerank_candidates(reranker, [query for queries, _ in searches for query in queries],
                               [own for _, candidates in searches for own in candidates], **settings)
    out, start = [], 0
    for queries, _ in searches:
        out.append(scores[start : start + len(queries)])
        start += len(queries)
    return out
