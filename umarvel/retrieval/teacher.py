"""Teacher scores for stage 3 (paper 3.3, Finding 6): the recall-then-rerank pipeline, scored
once over sampled training queries and fused, S = a * S_recall + (1 - a) * S_rerank.

Per sampled query (a seeded `distill.fraction` of the distinct training qids, drawn per task
as the official code does, or uniformly: `distill.sample`): one positive,
drawn by the seed among its positives in the pool, then the recall model's top `distill.top_k`
other candidates. A second positive of the query may be among them; the teacher scores it as
it scores everything, so unlike InfoNCE no positive is pushed away. S_recall is the recall
model's cosine, S_rerank the reranker's P(YES).

The scoring is resumable and split across the ranks of a launched job. Its work files live in
`<teacher file>.work/`:
    params.json        the settings the work is for; a run with other settings refuses it
    candidates.jsonl   rank 0's retrieval: {"skipped": [qids without a positive in the pool]},
                       then {"qid", "candidates", "recall"} per query
    shard-00000.jsonl  one block of `distill.shard_size` queries with the reranker's scores
                       added as "rerank"; shard i is scored by rank i mod world size
Every file is written atomically, so a killed run resumes at its first missing shard. Rank 0
then merges the shards, fusing with `distill.alpha`, into the teacher file
(`umarvel.data.sources.write_teacher_scores`). The work files are kept: after another alpha,
removing the teacher file re-merges it without scoring again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.config import Config, ConfigError, DistillConfig, EncodeConfig
from umarvel.data.mbeir import CandidatePool, Queries
from umarvel.data.sources import read_teacher_scores, write_teacher_scores
from umarvel.errors import UmarvelError
from umarvel.io import atomic_path, atomic_write_json
from umarvel.progress import progress_bar
from umarvel.retrieval.encode import EmbeddingCache, file_fingerprint, query_set
from umarvel.retrieval.index import gpu_choice, search_ids
from umarvel.retrieval.rerank import first_rows, fuse, rerank_candidates

logger = logging.getLogger("umarvel")
WORK_SUFFIX = ".work"
PARAMS = "params.json"
CANDIDATES = "candidates.jsonl"


def teacher_path(config: Config) -> Path:
    return Path(config.distill.teacher_file or Path(config.run.output_dir) / "teacher.jsonl")


def sample_query_rows(queries: Queries, fraction: float, seed: int, how: str = "per_task") -> list[int]:
    """Rows of a seeded `fraction` of the distinct qids, in file order.

    per_task (the default) draws within each (dataset, task), as the official code's
    get_10percent_training_data does, so every task keeps its share: floor(fraction x its
    distinct qids) as there (`len // 10`), but at least one, so that no task of a small set
    drops out (the M-BEIR training tasks all hold thousands, where the two agree). Each task's
    draw is seeded by the seed and the task alone. uniform draws round(fraction x all distinct
    qids), at least one, over the whole file: a task's share then varies with the draw.
    """
    rows = first_rows(queries)
    if how == "uniform":
        return sorted(random.Random(seed).sample(rows, max(1, round(fraction * len(rows)))))
    qids, task_ids = queries.table.column("qid").to_pylist(), queries.table.column("task_id").to_pylist()
    by_task: dict[tuple[str, int], list[int]] = {}
    for row in rows:
        by_task.setdefault((qids[row].split(":")[0], task_ids[row]), []).append(row)
    sample = []
    for (dataset, task), members in sorted(by_task.items()):
        # round() first: 0.29 * 100 is 28.999999999999996 in floats, 29 in the official integer division.
        count = max(1, math.floor(round(fraction * len(members), 9)))
        sample += random.Random(f"{seed}:{dataset}:{task}").sample(members, count)
    return sorted(sample)


def choose_positive(qid: str, positives: list[str], seed: int) -> str:
    """The query's positive of the distillation list: the same for the same seed."""
    return random.Random(f"{seed}:{qid}").choice(positives)


def candidate_list(positive: str, ranked: list[str], top_k: int) -> list[str]:
    """The positive, then the first `top_k` retrieved candidates other than it."""
    return [positive] + [did for did in ranked if did != positive][:top_k]


def directory_fingerprint(directory: str | Path) -> str:
    """Content hash of a model directory's weight and config files (not of a backbone it names)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(directory).iterdir()):
        if path.suffix in (".safetensors", ".json"):
            digest.update(f"{path.name}:{file_fingerprint(path)}".encode())
    return digest.hexdigest()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def retrieve(embedder, queries: Queries, pool: CandidatePool, rows: list[int], settings: DistillConfig,
             encode_config: EncodeConfig, *, seed: int, progress: bool = True) -> tuple[list[dict], list[str]]:
    """(records {"qid", "candidates", "recall"}, skipped qids) for the sampled `rows`.

    Every rank of a launched job must call this (each encodes its shards); rank 0 searches
    and returns the lists, the others return ([], []).
    """
    if len(pool) < settings.top_k + 1:
        raise ConfigError(f"distill.top_k={settings.top_k} needs a pool of at least {settings.top_k + 1} candidates; "
                          f"{pool.file} has {len(pool)}")
    use_instruction = embedder.settings.prompt.use_instruction
    cache = EmbeddingCache(embedder, encode_config, progress=progress)
    sources = [queries.file] + ([queries.instructions.file] if queries.instructions else [])
    name = f"distill_{Path(queries.file).stem}_sample{len(rows)}_seed{seed}"
    encoded_queries = cache.encode(query_set(name, queries, sources, use_instruction, rows))
    # The set name mining gives the pool, so a pool encoded for mining or reranker pairs is re-used.
    encoded_pool = cache.pool(f"mine_{Path(pool.file).stem}", pool, pool.file)
    if process.rank() != 0:
        return [], []
    query_vectors = encoded_queries.vectors().astype(np.float32)
    scores, ranked = search_ids(query_vectors, encoded_pool.shards, encoded_pool.ids, settings.top_k + 1,
                                use_gpu=gpu_choice(encode_config.use_gpu), progress=progress)
    records, skipped = [], []
    for i, row in enumerate(rows):
        record = queries.record(row)
        positives = [did for did in record["pos_cand_list"] if did in pool]
        if not positives:
            skipped.append(record["qid"])
            continue
        positive = choose_positive(record["qid"], positives, seed)
        recall = dict(zip(ranked[i], scores[i].tolist()))
        if positive not in recall:
            pool_row = pool.table.find(positive)
            if encoded_pool.ids[pool_row] != positive:
                raise UmarvelError(f"the encoded pool {encoded_pool.directory} is not in the order of {pool.file}")
            recall[positive] = float(encoded_pool.row(pool_row).astype(np.float32) @ query_vectors[i])
        candidates = candidate_list(positive, ranked[i], settings.top_k)
        records.append({"qid": record["qid"], "candidates": candidates, "recall": [recall[did] for did in candidates]})
    return records, skipped


def score_shards(reranker, queries: Queries, pool: CandidatePool, retrieved: list[dict], work: Path, *,
                 shard_size: int, batch_size: int, num_workers: int | None = None, progress: bool = True) -> int:
    """Add P(YES) to this rank's missing shards of `retrieved`; return the pairs scored."""
    rank, world = process.rank(), process.world_size()
    use_instruction = reranker.settings.prompt.use_instruction
    scored = 0
    missing = missing_shards(work, len(retrieved), shard_size, rank, world)
    bar = progress_bar(len(missing), "teacher shards", "shard", enabled=progress and rank == 0)
    for index in missing:
        block = retrieved[index * shard_size : (index + 1) * shard_size]
        query_items = [queries.item(queries.find(r["qid"]), use_instruction=use_instruction) for r in block]
        candidate_items = [[pool.get(did, needed_by=f"distillation query {r['qid']}") for did in r["candidates"]]
                           for r in block]
        rerank = rerank_candidates(reranker, query_items, candidate_items, batch_size=batch_size,
                                   num_workers=num_workers, progress=progress and rank == 0)
        _write_jsonl(work / shard_name(index), [{**r, "rerank": s} for r, s in zip(block, rerank)])
        scored += sum(len(r["candidates"]) for r in block)
        bar.update(1)
    bar.close()
    return scored


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


def missing_shards(work: Path, count: int, shard_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """The shards of `count` queries that rank `rank` of `world` owns and has not written yet."""
    shards = range((count + shard_size - 1) // shard_size)
    return [i for i in shards if i % world == rank and not (work / shard_name(i)).is_file()]


def merge_shards(work: Path, count: int, shard_size: int, path: Path, *, alpha: float, model: str,
                 params: dict) -> Path:
    """The teacher file: every shard's lists in order, scored S = a*S_recall + (1-a)*S_rerank."""
    def records():
        for index in range((count + shard_size - 1) // shard_size):
            for record in _read_jsonl(work / shard_name(index)):
                fused = fuse(np.asarray(record["recall"]), np.asarray(record["rerank"]), alpha)
                yield {"qid": record["qid"], "candidates": record["candidates"], "scores": fused.tolist()}

    return write_teacher_scores(path, records(), model=model, params=params)


class TeacherScoring:
    """Compute (or resume, or re-use) the teacher file of a distillation config.

    `recall_dir` and `reranker_dir` are resolved model directories; `device` is where this
    rank loads them. Every rank of a launched job must call `run()`.
    """

    def __init__(self, config: Config, queries: Queries, pool: CandidatePool, recall_dir: Path, reranker_dir: Path,
                 *, device: str, progress: bool = True):
        self.config, self.queries, self.pool = config, queries, pool
        self.recall_dir, self.reranker_dir, self.device, self.progress = recall_dir, reranker_dir, device, progress
        self.path = teacher_path(config)
        self.work = self.path.with_name(self.path.name + WORK_SUFFIX)
        settings = config.distill
        self.work_params = {
            "query_file": queries.file, "pool_file": pool.file, "fraction": settings.fraction, "sample": settings.sample,
            "top_k": settings.top_k, "seed": config.run.seed, "shard_size": settings.shard_size,
            "recall_model": str(recall_dir), "recall_fingerprint": directory_fingerprint(recall_dir),
            "reranker": str(reranker_dir), "reranker_fingerprint": directory_fingerprint(reranker_dir),
        }
        self.params = {**self.work_params, "alpha": settings.alpha}
        self.model = f"recall:{self.work_params['recall_fingerprint']}+rerank:{self.work_params['reranker_fingerprint']}"

    def run(self) -> Path:
        if self.path.is_file():
            self._check_made_by_these_settings()
            return self.path
        self._claim_work()
        retrieved, skipped = self._retrieved()
        rank, world = process.rank(), process.world_size()
        shard_size = self.config.distill.shard_size
        if missing_shards(self.work, len(retrieved), shard_size, rank, world):
            from umarvel.modeling.reranker import Reranker

            reranker = Reranker.from_pretrained(self.reranker_dir, device=self.device)
            started = time.perf_counter()
            scored = score_shards(reranker, self.queries, self.pool, retrieved, self.work, shard_size=shard_size,
                                  batch_size=self.config.encode.batch_size, num_workers=self.config.encode.num_workers,
                                  progress=self.progress)
            seconds = time.perf_counter() - started
            logger.info("teacher scores: rank %d reranked %d pairs in %.1f s (%.1f pairs/s)",
                        rank, scored, seconds, scored / max(seconds, 1e-9))
            del reranker
        process.barrier()
        if rank == 0:
            params = {**self.params, "queries": len(retrieved), "skipped_queries": len(skipped)}
            merge_shards(self.work, len(retrieved), shard_size, self.path, alpha=self.config.distill.alpha,
                         model=self.model, params=params)
            logger.info("teacher scores: %d queries x %d candidates -> %s",
                        len(retrieved), self.config.distill.top_k + 1, self.path)
        process.barrier()
        return self.path

    def _check_made_by_these_settings(self) -> None:
        made = read_teacher_scores(self.path).header["params"]
        differing = sorted(k for k, v in self.params.items() if made.get(k) != v)
        if differing:
            details = ", ".join(f"{k}: {made.get(k)!r} there, {self.params[k]!r} now" for k in differing)
            raise UmarvelError(f"{self.path} was made with other settings ({details}); remove it to score again "
                               f"(the work in {self.work} is re-used when only alpha changed)")

    def _claim_work(self) -> None:
        """Record the work's settings (rank 0, once); refuse work done for other settings."""
        file = self.work / PARAMS
        if process.rank() == 0 and not file.is_file():
            atomic_write_json(file, self.work_params)
        process.barrier()
        recorded = json.loads(file.read_text())
        if recorded != self.work_params:
            differing = sorted(k for k in self.work_params if recorded.get(k) != self.work_params[k])
            raise UmarvelError(f"{self.work} holds teacher work for other settings ({', '.join(differing)} differ); "
                               "remove it or set distill.teacher_file elsewhere")

    def _retrieved(self) -> tuple[list[dict], list[str]]:
        """The candidate lists with their recall scores: read back, or retrieved (rank 0 writes)."""
        file = self.work / CANDIDATES
        if not file.is_file():
            from umarvel.modeling.embedder import Embedder

            embedder = Embedder.from_pretrained(self.recall_dir, device=self.device)
            settings = self.config.distill
            rows = sample_query_rows(self.queries, settings.fraction, self.config.run.seed, settings.sample)
            records, skipped = retrieve(embedder, self.queries, self.pool, rows, settings, self.config.encode,
                                        seed=self.config.run.seed, progress=self.progress)
            del embedder
            if process.rank() == 0:
                if skipped:
                    logger.warning("%d sampled queries have no positive in %s and are left out (e.g. %s)",
                                   len(skipped), self.pool.file, skipped[:3])
                _write_jsonl(file, [{"skipped": skipped}] + records)
            process.barrier()
        head, *records = _read_jsonl(file)
        return records, head["skipped"]
