"""Approximate search against exact: IVF and HNSW recall@10, speed-up, build time and bytes per vector.

Three pools, every index built and searched on each in one run:
  random     --n unit vectors drawn uniformly on the sphere, queries likewise (the hardest case:
             no structure, neighbours barely closer than the rest)
  clustered  --n unit vectors of a Gaussian mixture (--clusters centres on the sphere, uneven
             cluster sizes, each point about 0.8 cosine from its centre), queries from the same mixture
  mbeir      an encoded M-BEIR pool: by default the synthetic global test pool (`umarvel data synth`,
             size medium, 3204 candidates) and its 16 rows' test queries, encoded by a fresh tiny
             model; with --pool, any M-BEIR cand pool (or corpus jsonl), --model and --queries
Indexes are built as `umarvel index build` builds them (serving.index_store: inner product over
unit fp32 rows, IVF/PQ trained on a seeded sample of at most 262,144 rows). Recall@10 is measured
against umarvel's exact search (retrieval.index.search); a found item counts when its true
score reaches the exact 10th score, so ties in the exact top 10 cost no recall. Speed-up is
against the Flat index's search of the same queries (faiss's default threads, all of a batch at
once); bytes per vector is the serialized index over the pool size. Search times are the best of
--repeats.

    python scripts/bench_index.py          # --n 100000 --dim 128 --nq 1000 --clusters 1000 --k 10 --repeats 2
    python scripts/bench_index.py --sets clustered --n 1000000 --index "IVF{nlist},Flat:nprobe=8/nprobe=32/nprobe=128"
    python scripts/bench_index.py --sets mbeir --pool data/M-BEIR/cand_pool/global/mbeir_union_test_cand_pool.jsonl \\
        --model runs/umarvel/distill --queries data/M-BEIR/query/test/*.jsonl
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETS = ("random", "clustered", "mbeir")
# FACTORY[:PARAMS/PARAMS...]; {nlist} = 4 sqrt(N) lists, {pq} = dim/4 one-byte codes (4 dims per byte).
# SQ8 (one byte a dimension) is the memory option here; PQ is left to --index: its codebook
# training took 85-170 s at 100k x 128 on the shared cores, more than the rest of a set. Write PQ
# as "PQ{pq}np": faiss's factory otherwise adds polysemous training, which umarvel's searches
# never use and which doubled the training time (PQ32, 20k vectors: 318 s against 123-150 s).
INDEXES = ("IVF{nlist},Flat:nprobe=8/nprobe=32/nprobe=128", "IVF{nlist},SQ8:nprobe=32",
           "HNSW32:efSearch=64/efSearch=128")
# Noise norm around a cluster centre: a point's cosine to its centre is about 1 / sqrt(1 + 0.75^2) = 0.8.
SPREAD = 0.75
# A found item ties the exact k-th score within fp32 summation-order error.
TIE = 1e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {list(SETS)}")
    parser.add_argument("--n", type=int, default=100_000,
                        help="pool size of the random and clustered sets (at 1M on 2 shared cores, IVF4000 trains in "
                             "4 minutes and HNSW32 did not finish building in 8)")
    parser.add_argument("--dim", type=int, default=128, help="dimension of the random and clustered sets")
    parser.add_argument("--nq", type=int, default=1000,
                        help="queries of the random and clustered sets (and pool rows used as queries without --queries)")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", action="append",
                        help="FACTORY[:PARAMS/PARAMS...], repeatable; Flat is always measured, as the baseline "
                             f"(default: {' '.join(INDEXES)})")
    parser.add_argument("--repeats", type=int, default=2, help="searches per setting; the fastest counts")
    parser.add_argument("--pool", help="an M-BEIR candidate pool jsonl (or corpus jsonl) to encode instead of "
                                       "the synthetic global pool")
    parser.add_argument("--model", help="model directory (default: a fresh tiny Qwen2-VL)")
    parser.add_argument("--queries", nargs="+", help="M-BEIR query jsonl files; with --pool and none, --nq pool "
                                                     "vectors serve as queries (each finds itself first)")
    parser.add_argument("--image-root", help="root of the pool's and queries' images (default: the directory "
                                             "above cand_pool/)")
    parser.add_argument("--cache-dir", help="embedding cache (default with --pool: umarvel's shared cache, so a "
                                            "pool is encoded once; without: a temporary one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sets = args.sets.split(",")
    if set(sets) - set(SETS):
        parser.error(f"unknown sets {sorted(set(sets) - set(SETS))}")
    if args.pool and args.model is None:
        parser.error("--pool needs --model: the tiny model's vectors of a real pool say nothing")
    with tempfile.TemporaryDirectory(prefix="bench_index.") as tmp:
        if not args.pool:
            os.environ["UMARVEL_CACHE"] = str(Path(tmp) / "cache")  # synthetic tables: before umarvel reads it
        import faiss

        print(f"load average {_load()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
              f"k={args.k}, best of {args.repeats} searches", flush=True)
        for name in sets:
            start = time.perf_counter()
            label, shards, queries = _pool(name, args, Path(tmp))
            _bench(label, shards, queries, args)
            print(f"({name}: {time.perf_counter() - start:.0f} s in all, load average {_load()})\n", flush=True)
    return 0


def _pool(name: str, args, tmp: Path) -> tuple[str, list[np.ndarray], np.ndarray]:
    """(label, pool shards, queries) of one set."""
    rng = np.random.default_rng(args.seed)
    if name == "random":
        return f"random: {args.n} unit vectors, dim {args.dim}", [_unit(rng, args.n, args.dim)], \
            _unit(rng, args.nq, args.dim)
    if name == "clustered":
        centres = _unit(rng, args.clusters, args.dim)
        weights = rng.lognormal(0.0, 1.0, args.clusters)
        weights /= weights.sum()
        label = f"clustered: {args.n} unit vectors, dim {args.dim}, {args.clusters} uneven Gaussian clusters"
        return label, [_mixture(rng, centres, weights, args.n)], _mixture(rng, centres, weights, args.nq)
    return _encoded(args, tmp, rng)


def _unit(rng, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _mixture(rng, centres: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    dim = centres.shape[1]
    rows = centres[rng.choice(len(centres), n, p=weights)]
    rows += rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(SPREAD / math.sqrt(dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _encoded(args, tmp: Path, rng) -> tuple[str, list[np.ndarray], np.ndarray]:
    """An M-BEIR pool and its queries encoded through the embedding cache, as `umarvel index build`
    and `umarvel eval mbeir` encode them (query sets named as the evaluator names them)."""
    import torch

    from umarvel import Embedder
    from umarvel.config import EncodeConfig
    from umarvel.data.mbeir import Instructions, open_queries
    from umarvel.data.tasks import EVAL_ROWS, GLOBAL_POOL, QUERY_INSTRUCTIONS
    from umarvel.retrieval.encode import EmbeddingCache, query_set
    from umarvel.serving.corpus import _mbeir_root, open_corpus

    torch.manual_seed(args.seed)
    pool_file, query_files, model = args.pool, args.queries or [], args.model
    if not args.pool:
        from umarvel.data.synthetic import write_synthetic
        from umarvel.tiny import build_tiny_model

        root = write_synthetic(tmp / "synthetic", seed=args.seed, size="medium")
        pool_file = root / GLOBAL_POOL.format(split="test")
        query_files = [root / row.query_file("test") for row in EVAL_ROWS]
        model = model or build_tiny_model(tmp / "tiny", seed=args.seed)
    embedder = Embedder.from_pretrained(model).eval()
    cache_dir = args.cache_dir or ("" if args.pool else str(tmp / "embeddings"))
    cache = EmbeddingCache(embedder, EncodeConfig(cache_dir=cache_dir, batch_size=args.batch_size))
    pool = cache.encode(open_corpus(pool_file, args.image_root).items)
    root = Path(args.image_root) if args.image_root else _mbeir_root(Path(pool_file))
    instructions_file = root / QUERY_INSTRUCTIONS
    instructions = Instructions.load(instructions_file) if instructions_file.is_file() else None
    parts = []
    for file in query_files:
        name = Path(file).stem.removeprefix("mbeir_") + "_queries"
        sources = [file, instructions_file] if instructions else [file]
        queries = open_queries(file, root, instructions)
        parts.append(cache.encode(query_set(name, queries, sources, embedder.settings.prompt.use_instruction)).vectors())
    if parts:
        queries, described = np.concatenate(parts), f"{len(query_files)} query files"
    else:
        queries = _rows(pool.shards, np.sort(rng.choice(len(pool), min(args.nq, len(pool)), replace=False)))
        described = "pool vectors as queries"
    label = f"mbeir: {pool_file} ({len(pool)} vectors, dim {pool.dim}), {model}, {described}"
    return label, pool.shards, queries


def _rows(shards: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (counted across the shards) as unit fp32 vectors."""
    from umarvel.retrieval.index import normalized_fp32

    starts = np.cumsum([0] + [len(shard) for shard in shards])
    which = np.searchsorted(starts, ids, side="right") - 1
    out = np.empty((len(ids), shards[0].shape[1]), np.float32)
    for number, shard in enumerate(shards):
        mask = which == number
        if mask.any():
            out[mask] = normalized_fp32(shard[ids[mask] - starts[number]])
    return out


def recall_at_k(exact_scores: np.ndarray, found_scores: np.ndarray, k: int) -> float:
    """Mean share of the k found items whose true score reaches the exact k-th best score.

    Without ties this is |found top k & exact top k| / k; an item tied with the exact k-th one
    counts too, since exact search could have returned it as well. Missing results (faiss id -1)
    carry -inf."""
    kth = exact_scores[:, k - 1 : k]
    return float(np.mean(np.sum(found_scores[:, :k] >= kth - TIE, axis=1) / k))


def _true_scores(shards: list[np.ndarray], queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact inner products of every query with its found ids; -inf where faiss found none."""
    valid = ids >= 0
    vectors = _rows(shards, np.where(valid, ids, 0).ravel()).reshape(*ids.shape, -1)
    return np.where(valid, np.einsum("qkd,qd->qk", vectors, queries), -np.inf)


def _bench(label: str, shards: list[np.ndarray], queries: np.ndarray, args) -> None:
    import faiss

    from umarvel.retrieval.index import normalized_fp32, search
    from umarvel.serving.index_store import fill_index, new_faiss_index, set_search_params

    count, dim = sum(len(shard) for shard in shards), shards[0].shape[1]
    queries = normalized_fp32(queries)
    start = time.perf_counter()
    exact_scores, _ = search(queries, shards, args.k, use_gpu=False, normalize=True)
    exact_seconds = time.perf_counter() - start
    nlist = max(1, round(4 * math.sqrt(count)))
    print(f"{label}\n{len(queries)} queries; exact search (umarvel search, chunked fp32): "
          f"{len(queries) / exact_seconds:.0f} queries/s; IVF lists: 4 sqrt(N) = {nlist}\n")
    print(f"| index | search | recall@{args.k} | queries/s | speed-up | build s | bytes/vector |")
    print("|---|---|---|---|---|---|---|")
    flat_seconds = None
    for spec in ["Flat", *(args.index or INDEXES)]:
        factory, _, settings = spec.partition(":")
        factory = factory.format(nlist=nlist, pq=max(1, dim // 4))
        start = time.perf_counter()
        index = fill_index(new_faiss_index(factory, dim), shards, seed=args.seed)
        build = time.perf_counter() - start
        size = len(faiss.serialize_index(index)) / count
        for params in settings.split("/") if settings else [""]:
            set_search_params(index, params)
            seconds = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                _, ids = index.search(queries, args.k)
                seconds = min(seconds, time.perf_counter() - start)
            flat_seconds = flat_seconds or seconds
            recall = recall_at_k(exact_scores, _true_scores(shards, queries, ids), args.k)
            print(f"| {factory} | {params or '-'} | {recall:.3f} | {len(queries) / seconds:.0f} | "
                  f"{flat_seconds / seconds:.1f} | {build:.1f} | {size:.0f} |", flush=True)
        del index


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
