"""Validation during training: recall on a sampled M-BEIR val pool every `train.eval_steps`
updates, and the best model by it kept as the run's model (the Trainer's
`load_best_model_at_end` with `metric_for_best_model`).

The pool is drawn once (seeded by run.seed, so every evaluation and every rank sees the same
one) through the M-BEIR readers: `train.eval_queries` val queries of the rows of
eval.mbeir.rows, and as candidates their positives plus random others of those rows' local
pools, `train.eval_pool_size` in all. Exact search, recall as `umarvel.evaluation.metrics`
counts it (percent). Under a launcher every rank encodes the same items in the same batches
(ZeRO-3 gathers weights collectively, so no rank may skip a forward) and all take rank 0's
numbers, so they agree on the best step.

Each new best is written to `best/` (a loadable adapter directory, atomically) and recorded in
`best.json` (step and recall); `TrainerState.best_metric`/`best_global_step` carry it through
checkpoints. At the end the best weights are loaded back before model/ and merged/ are saved.
"""
from __future__ import annotations

import bisect
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from umarvel import process
from umarvel.config import Config, ConfigError
from umarvel.io import atomic_write_json

logger = logging.getLogger("umarvel")

KS = (1, 5, 10)
BEST_DIR = "best"
BEST_FILE = "best.json"


@dataclass
class ValPool:
    """The sampled queries (keyed `row/qid`), the candidates searched, and each query's positives."""

    keys: list[str]
    queries: list[dict]
    candidates: list[dict]
    qrels: dict[str, set[str]]

    def __len__(self) -> int:
        return len(self.queries)


def enabled(config: Config) -> bool:
    """Whether the stage measures val recall: asked for, on M-BEIR data (the only one with a val split)."""
    return config.train.eval_steps > 0 and config.data.source == "mbeir"


def sample_val_pool(config: Config) -> ValPool | None:
    """The stage's val pool, or None when validation is off or the data has no val split (NLI,
    CC3M: one log line). An M-BEIR root without val queries is an error: it was asked for."""
    from umarvel.data.mbeir import MBEIR
    from umarvel.data.tasks import positive_pool_rows
    from umarvel.evaluation.mbeir import selected_rows

    train, data = config.train, config.data
    if not train.eval_steps:
        return None
    if not enabled(config):
        logger.info("train.eval_steps: %s data has no val split; this stage trains without val recall", data.source)
        return None
    started = time.perf_counter()
    mbeir = MBEIR(data.path, on_error=data.on_error, symlinks_outside_root=data.allow_symlinks_outside_root)
    rows = [row for row in selected_rows(config.eval.mbeir.rows) if mbeir.path(row.query_file("val")).is_file()]
    if not rows:
        raise ConfigError(f"train.eval_steps={train.eval_steps}: {mbeir.root} has no val split (no query/val/ file "
                          "of the rows of eval.mbeir.rows): set train.eval_steps=0, or add the val queries")
    rng = random.Random(config.run.seed)
    tables = {row: mbeir.queries("val", row) for row in rows}
    refs = [(row, index) for row in rows for index in range(len(tables[row]))]
    row_qrels, keys, queries, qrels = {}, [], [], {}
    for pick in sorted(rng.sample(range(len(refs)), min(train.eval_queries, len(refs)))):
        row, index = refs[pick]
        item = tables[row].item(index, use_instruction=config.model.prompt.use_instruction)
        if row not in row_qrels:
            row_qrels[row] = mbeir.qrels("val", row)
        key = f"{row.name}/{item['qid']}"
        keys.append(key)
        queries.append(item)
        qrels[key] = row_qrels[row][item["qid"]]
    pools = [mbeir.local_pool(row) for row in dict.fromkeys(other for row in rows for other in positive_pool_rows(row))]
    candidates = {did: next(pool for pool in pools if did in pool).get(did)
                  for did in sorted(set().union(*qrels.values()))}
    positives = len(candidates)
    starts = [0]
    for pool in pools:
        starts.append(starts[-1] + len(pool))
    for pick in rng.sample(range(starts[-1]), min(starts[-1], train.eval_pool_size)):
        if len(candidates) >= train.eval_pool_size:
            break
        which = bisect.bisect_right(starts, pick) - 1
        item = pools[which].item(pick - starts[which])
        candidates.setdefault(item["did"], item)
    shuffled = list(candidates.values())
    rng.shuffle(shuffled)  # search breaks ties by position: positives first would inflate recall
    if process.is_main_process():
        logger.info("val recall pool: %d queries of %d rows of %s, %d candidates (%d positives) in %.1fs",
                    len(queries), len(rows), mbeir.root, len(shuffled), positives, time.perf_counter() - started)
    return ValPool(keys, queries, shuffled, qrels)


class Validation(TrainerCallback):
    """Measure the pool's recall with the training embedder and keep the best model by it."""

    def __init__(self, pool: ValPool, config: Config, embedder, run_dir: Path):
        if not embedder.has_adapter:
            raise ConfigError("train.eval_steps: the best model is kept as its LoRA adapter; set "
                              "model.lora.enabled=true, or train.eval_steps=0")
        self.pool, self.run_dir = pool, Path(run_dir)
        self.batch_size = config.encode.batch_size
        self.metric = f"eval_{config.train.eval_metric}"

    def measure(self, embedder, prefix: str = "eval") -> dict[str, float]:
        """`{prefix}_recall@k` (percent) for k in KS, rank 0's on every rank, and `{prefix}_runtime`
        (seconds), as the Trainer names its evaluation's time. Every rank calls it."""
        from umarvel.evaluation.metrics import hit_rates
        from umarvel.retrieval.index import search_ids

        started, pool = time.perf_counter(), self.pool
        queries = embedder.encode(pool.queries, batch_size=self.batch_size, num_workers=0)
        candidates = embedder.encode(pool.candidates, batch_size=self.batch_size, num_workers=0)
        _, ranked = search_ids(queries, candidates, [item["did"] for item in pool.candidates], max(KS), use_gpu=False)
        recall = process.from_main(hit_rates(dict(zip(pool.keys, ranked)), pool.qrels, KS))
        return {**{f"{prefix}_recall@{k}": value for k, value in recall.items()},
                f"{prefix}_runtime": round(time.perf_counter() - started, 2)}

    def keep_if_best(self, embedder, state, metrics: dict[str, float], *, write: bool) -> None:
        """A new best (strictly above the last; the earlier step wins a tie) is written to best/
        and best.json. Every rank calls it (the adapter is gathered under ZeRO-3); `write` writes."""
        value = metrics[self.metric]
        if state.best_metric is not None and value <= state.best_metric:
            return
        state.best_metric, state.best_global_step = value, state.global_step
        embedder.write_adapter(self.run_dir / BEST_DIR, write=write, atomic=True)
        if write:
            atomic_write_json(self.run_dir / BEST_FILE, {"step": state.global_step, "metric": self.metric,
                                                         "value": value, "metrics": metrics})
            logger.info("new best %s %.2f at step %d -> %s", self.metric, value, state.global_step,
                        self.run_dir / BEST_DIR)

    def on_train_begin(self, args, state, control, **kwargs):
        """Start from the best the (resumed) state names only when best/ holds it; a best/ of a
        step the resume went back past, or of an earlier attempt, is dropped. Rank 0 decides."""
        recorded = self.recorded() if process.is_main_process() else None
        kept = process.from_main(state.best_global_step is not None and recorded is not None
                                 and recorded["step"] == state.best_global_step)
        if kept:
            return
        if process.is_main_process():
            if state.best_global_step is not None:
                logger.warning("the best model of step %d is no longer in %s; the best is tracked anew from step %d",
                               state.best_global_step, self.run_dir / BEST_DIR, state.global_step)
            (self.run_dir / BEST_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / BEST_DIR, ignore_errors=True)
        state.best_metric = state.best_global_step = None

    def recorded(self) -> dict | None:
        path = self.run_dir / BEST_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def restore_best(self, embedder, state) -> dict | None:
        """Load the best weights back into `embedder` (every rank) unless the last step is the
        best; the best record, or None when nothing was evaluated."""
        from umarvel.modeling.adapters import gathered

        if state.best_global_step is None:
            return None
        record = self.recorded() if process.is_main_process() else None
        record = process.from_main(record)
        if state.best_global_step != state.global_step:
            with gathered(embedder.trainable_parameters(), modifier_rank=0):
                embedder.load_adapter_weights(self.run_dir / BEST_DIR)
        if process.is_main_process():
            logger.info("the run's model is the best by %s: step %d (%.2f), of %d steps",
                        self.metric, state.best_global_step, state.best_metric, state.global_step)
        return record
