"""The shared runner of the evaluator protocol: encode, search, write run files, score, report.

Every item set of a benchmark is encoded once into the embedding cache (a set shared by two
searches, or by two benchmarks of one runner, is encoded and loaded once), with the prompt
settings the benchmark asks for (`prompt_overrides`; they are part of the cache fingerprint).
Under a launcher every rank encodes its shards and rank 0 alone searches, scores and writes.

Ranking is exact inner product. A search over all candidates goes through FAISS
(umarvel.retrieval.index); a search restricted to per-query galleries scores each query's own
candidates only. Both break equal scores by the lower position in the candidate set, so a
ranking never depends on chunking or on the order a gallery lists its candidates in.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.config import to_dict
from umarvel.errors import DataError, UmarvelError
from umarvel.evaluation.protocol import Benchmark, ItemSet, Ranking, Retrieval
from umarvel.evaluation.report import write_run_file
from umarvel.retrieval.encode import EmbeddingCache, EncodedSet
from umarvel.retrieval.index import gpu_choice, search_ids

logger = logging.getLogger("umarvel")

# One benchmark's searches, each with its encoded queries and candidates.
Searches = list[tuple[Retrieval, EncodedSet, EncodedSet]]
RankFn = Callable[[Searches], list[Ranking]]


class Runner:
    """Run benchmarks for one embedder with one set of encoding settings (`config`: batch_size,
    shard_size, cache_dir, use_gpu). `rank` replaces the search step of all of a benchmark's
    searches at once (U-MARVEL+ re-scores every search's top-k in one reranker pass); by default
    each is `Runner.search`."""

    def __init__(self, embedder, config, *, progress: bool = True, rank: RankFn | None = None):
        self.embedder, self.config, self.progress = embedder, config, progress
        self.use_gpu = gpu_choice(config.use_gpu)
        self.rank = rank or self.search_each
        self._caches: dict[str, EmbeddingCache] = {}
        self._encoded: dict[tuple, EncodedSet] = {}

    @property
    def cache(self) -> EmbeddingCache:
        """The cache of the embedder as its prompt settings are now (they are fingerprinted)."""
        key = json.dumps(to_dict(self.embedder.settings.prompt), sort_keys=True)
        if key not in self._caches:
            self._caches[key] = EmbeddingCache(self.embedder, self.config, progress=self.progress)
        return self._caches[key]

    def encode(self, item_set: ItemSet) -> EncodedSet:
        cache = self.cache
        key = (cache.model, item_set.name, tuple(map(str, item_set.sources)), len(item_set))
        if key not in self._encoded:
            self._encoded[key] = cache.encode(item_set)
        return self._encoded[key]

    def run(self, benchmark: Benchmark, output_dir: str | os.PathLike) -> dict[str, float] | None:
        """Encode (every rank, with the benchmark's prompt overrides), then rank, write the run
        files and the report (rank 0); the benchmark's metrics on rank 0, None on the others."""
        retrievals = benchmark.retrievals()
        with self._prompt_of(benchmark):
            encoded = [(self.encode(r.queries), self.encode(r.candidates)) for r in retrievals]
        if process.rank() != 0:
            return None
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rankings = {}
        ranked = self.rank([(retrieval, queries, candidates) for retrieval, (queries, candidates) in zip(retrievals, encoded)])
        for retrieval, ranking in zip(retrievals, ranked, strict=True):
            qids = list(ranking.ids)
            write_run_file(out / retrieval.run_file_name, qids, [ranking.ids[q] for q in qids],
                           [ranking.scores[q] for q in qids], task_id=retrieval.task_id)
            rankings[retrieval.name] = ranking
        metrics = benchmark.score(rankings)
        benchmark.write_report(out, metrics)
        return metrics

    def _prompt_of(self, benchmark: Benchmark):
        """A context encoding with the benchmark's prompt overrides (none: the embedder as it is)."""
        prompt = self.embedder.settings.prompt
        overrides = dict(benchmark.prompt_overrides)
        unknown = [name for name in overrides if not hasattr(prompt, name)]
        if unknown:
            raise UmarvelError(f"{benchmark.name}: prompt_overrides {unknown} are not fields of the prompt config "
                               f"(model.prompt: {', '.join(to_dict(prompt))})")
        changed = {name: value for name, value in overrides.items() if getattr(prompt, name) != value}
        return self.embedder.prompt_overridden(**changed) if changed else nullcontext()

    def search_each(self, searches: Searches) -> list[Ranking]:
        return [self.search(retrieval, queries, candidates) for retrieval, queries, candidates in searches]

    def search(self, retrieval: Retrieval, queries: EncodedSet, candidates: EncodedSet, k: int | None = None) -> Ranking:
        """Each query's best `k` (default retrieval.k) candidates: over all of them, or over
        its gallery when the retrieval has galleries."""
        k = k or retrieval.k
        if retrieval.galleries is not None:
            return gallery_search(queries, candidates, retrieval.galleries, k, retrieval.name)
        scores, ranked = search_ids(queries.vectors(), candidates.shards, candidates.ids, k, use_gpu=self.use_gpu)
        return ranking_of(queries.ids, ranked, scores)


def ranking_of(qids, ranked, scores) -> Ranking:
    """A Ranking from per-query lists in query order (scores may be an array)."""
    return Ranking(ids={qid: list(dids) for qid, dids in zip(qids, ranked)},
                   scores={qid: [float(s) for s in row] for qid, row in zip(qids, scores)})


def gallery_search(queries: EncodedSet, candidates: EncodedSet, galleries, k: int, name: str) -> Ranking:
    """Exact top-k of each query among its own gallery's candidates, in fp32; equal scores go
    to the candidate earlier in the candidate set. A query without a gallery, or a gallery id
    that is not a candidate, is a data error naming the search and the query."""
    position = {cid: index for index, cid in enumerate(candidates.ids)}
    matrix = candidates.vectors().astype(np.float32)
    query_vectors = queries.vectors().astype(np.float32)
    ids, scores = {}, {}
    for row, qid in enumerate(queries.ids):
        if qid not in galleries:
            raise DataError(f"{name}: query {qid} has no gallery")
        members = list(dict.fromkeys(galleries[qid]))
        unknown = [cid for cid in members if cid not in position]
        if unknown:
            raise DataError(f"{name}: the gallery of query {qid} names candidates {unknown[:5]} that are not in "
                            f"the candidate set")
        indices = np.array(sorted(position[cid] for cid in members), dtype=np.int64)
        values = matrix[indices] @ query_vectors[row]
        order = np.lexsort((indices, -values))[:k]
        ids[qid] = [candidates.ids[i] for i in indices[order]]
        scores[qid] = [float(v) for v in values[order]]
    return Ranking(ids=ids, scores=scores)
