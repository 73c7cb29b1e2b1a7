"""Stage `reranker`: train the YES/NO reranker on a recall model's top-N (paper 3.3).

The run directory holds config.yaml, pairs.jsonl (the training pairs, retrieved once by rank
0 and read by every rank; a resumed run re-uses them), checkpoint-N/ (adapter + reranker
config + trainer state), model/ (the final reranker), log_history.json, metrics.json,
training.png and, written last, DONE. The Trainer's loop and loss are the stock ones: the
reranker's forward returns the next-token loss of the answer token; the step logs add the
YES/NO accuracy. It has no val recall: train.eval_steps is ignored here, with a log line.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from umarvel.config import Config, ConfigError, to_dict
from umarvel.data.rerank import IGNORED_LABEL, read_pairs, write_pairs
from umarvel import process
from umarvel.training import runs
from umarvel.training.telemetry import TelemetryTrainer, run_loss, stage_summary
from umarvel.training.stages import training_arguments

logger = logging.getLogger("umarvel")
PAIRS_FILE = "pairs.jsonl"


class RerankTrainer(TelemetryTrainer):
    """The stock Trainer's loss and loop, its step logs with the batches' YES/NO accuracy; its
    checkpoints are loadable reranker directories (adapter only)."""

    @property
    def reranker(self):
        return self.accelerator.unwrap_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.record({"accuracy": answer_accuracy(outputs.logits, inputs["labels"], self.reranker.answer_ids)})
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """As ContrastiveTrainer._save: every rank gathers the live adapter, the saving process writes."""
        self.reranker.write_adapter(output_dir or self.args.output_dir, write=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume without DeepSpeed (under DeepSpeed the engine's own checkpoint is loaded)."""
        self.reranker.load_adapter_weights(resume_from_checkpoint)


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, answer_ids: dict[str, int]) -> float:
    """Share of rows whose labelled answer (YES or NO) has the larger of the two answer logits."""
    answers = labels[labels != IGNORED_LABEL]
    said_yes = logits[:, answer_ids["YES"]] > logits[:, answer_ids["NO"]]
    return float((said_yes == (answers == answer_ids["YES"])).float().mean())


def _check(config: Config) -> None:
    rerank = config.rerank
    if not config.data.path:
        raise ConfigError("data.path is empty: set it to the M-BEIR root the reranker trains on")
    if not rerank.recall_model:
        raise ConfigError("rerank.recall_model is empty: set it to the recall embedder (e.g. runs/umarvel/hardneg)")


def training_data(config: Config):
    """(queries, pool) of the data section: M-BEIR train queries and the pool they search."""
    from umarvel.data.mbeir import MBEIR, mbeir_root, open_pool, open_queries
    from umarvel.data.tasks import GLOBAL_POOL, UNION_TRAIN_QUERIES

    data, root = config.data, mbeir_root(config.data.path)
    query_file = data.train_queries or UNION_TRAIN_QUERIES
    links = data.allow_symlinks_outside_root
    queries = open_queries(root / query_file, root, MBEIR(root, on_error=data.on_error).instructions,
                           upsampled=query_file == UNION_TRAIN_QUERIES, on_error=data.on_error,
                           symlinks_outside_root=links)
    pool = open_pool(root / (data.pool or GLOBAL_POOL.format(split="train")), root, on_error=data.on_error,
                     symlinks_outside_root=links)
    return queries, pool


def _pairs(config: Config, queries, pool, pairs_file: Path, device: torch.device) -> list:
    """The run's training pairs: read back, or retrieved with the recall model (rank 0 writes)."""
    from umarvel.modeling.embedder import Embedder
    from umarvel.retrieval.rerank import recall_training_pairs

    if not pairs_file.is_file():
        embedder = Embedder.from_pretrained(config.rerank.recall_model, device=str(device))
        pairs, stats = recall_training_pairs(embedder, queries, pool, config.rerank, config.encode, seed=config.run.seed)
        del embedder
        if process.is_main_process():
            params = {**to_dict(config.rerank), "query_file": queries.file, "pool_file": pool.file,
                      "seed": config.run.seed, **stats}
            write_pairs(pairs_file, pairs, params)
            logger.info("reranker pairs: %d queries, %d YES, %d NO -> %s",
                        stats["queries"], stats["yes"], stats["no"], pairs_file)
        process.barrier()
    return read_pairs(pairs_file)


def train_reranker(config: Config, *, resume: bool = False, force: bool = False) -> Path:
    """Run the reranker stage to completion; a finished run directory is left as it is."""
    from umarvel.data.rerank import RerankTrainSet
    from umarvel.modeling.reranker import Reranker
    from umarvel.training.trainer import EpochResampling

    _check(config)
    args = training_arguments(config, Path(config.run.output_dir))  # joins a launcher's process group
    if config.train.eval_steps and process.is_main_process():
        logger.info("train.eval_steps: the reranker stage measures no val recall (its step logs carry accuracy)")
    run = runs.start(config, resume=resume, force=force)
    if run.finished:
        return run.directory
    run_dir = run.directory
    queries, pool = training_data(config)
    pairs = _pairs(config, queries, pool, run_dir / PAIRS_FILE, args.device)
    model_overrides = {k: v for k, v in to_dict(config.model).items() if k != "backbone"}
    reranker = Reranker.from_pretrained(config.model.backbone, trainable=True, **model_overrides)
    dataset = RerankTrainSet(pairs, queries, pool, seed=config.run.seed,
                             use_instruction=config.model.prompt.use_instruction)
    global_batch = config.train.per_device_batch_size * process.world_size()
    trainer = RerankTrainer(
        model=reranker, args=args, train_dataset=dataset, data_collator=reranker.collator,
        callbacks=[EpochResampling(dataset)],
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    seconds = time.perf_counter() - started
    trainer.reranker.save_pretrained(run_dir / "model", write=trainer.args.should_save)  # collective under ZeRO-3
    yes = sum(pair.answer == "YES" for pair in pairs)
    metrics = {**result.metrics, "train_loss": run_loss(trainer.state.log_history), "global_batch": global_batch, "steps": trainer.state.global_step,
               "pairs": len(pairs), "yes": yes, "no": len(pairs) - yes, "wall_seconds": seconds}
    if process.is_main_process():
        logger.info(stage_summary(run_dir.name, trainer.state.global_step, global_batch, metrics,
                                  trainer.state.log_history))
    runs.finish(run, metrics, trainer.state.log_history)
    return run_dir
