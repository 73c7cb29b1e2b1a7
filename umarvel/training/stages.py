"""Recipes per stage: build the data, the embedder and the Trainer from a config, and run.

A contrastive run directory holds config.yaml, checkpoint-N/ (adapter + temperature +
trainer state), model/ (the final adapter), merged/ (the final merged checkpoint the next
stage starts from), log_history.json, metrics.json, training.png and, written last, DONE;
with validation on, also best/ and best.json, and model/ and merged/ are the best model.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from umarvel import process
from umarvel.config import Config, ConfigError, build_config, deep_merge, read_raw, to_dict
from umarvel.data.collator import PairCollator
from umarvel.errors import UmarvelError
from umarvel.training import runs, validation
from umarvel.training.telemetry import run_loss, stage_summary

logger = logging.getLogger("umarvel")



def build_pairs(config: Config):
    """The training pairs of a stage's data section."""
    from umarvel.data import sources
    from umarvel.data.mbeir import MBEIR, MBEIRTrainPairs, NegativeSelection, mbeir_root, open_pool, open_queries
    from umarvel.data.tasks import GLOBAL_POOL, UNION_TRAIN_QUERIES

    data = config.data
    if not data.path:
        raise ConfigError("data.path is empty: set it to the M-BEIR root, the NLI csv or the CC3M file")
    if data.source == "nli":
        pairs = sources.NLIPairs(data.path, on_error=data.on_error)
    elif data.source == "cc3m":
        pairs = sources.CC3MPairs(data.path, data.image_root or Path(data.path).parent, on_error=data.on_error,
                                  symlinks_outside_root=data.allow_symlinks_outside_root)
    else:
        root = mbeir_root(data.path)
        instructions = MBEIR(root, on_error=data.on_error).instructions
        query_file = data.train_queries or UNION_TRAIN_QUERIES
        links = data.allow_symlinks_outside_root
        queries = open_queries(root / query_file, root, instructions, upsampled=query_file == UNION_TRAIN_QUERIES,
                               on_error=data.on_error, symlinks_outside_root=links)
        pool = open_pool(root / (data.pool or GLOBAL_POOL.format(split="train")), root, on_error=data.on_error,
                         symlinks_outside_root=links)
        mined = sources.read_hard_negatives(data.hard_negatives) if data.hard_negatives else None
        pairs = MBEIRTrainPairs(
            queries,
            pool,
            seed=config.run.seed,
            use_instruction=config.model.prompt.use_instruction,
            hard_negatives=mined,
            negatives=NegativeSelection(data.num_negatives, data.negative_selection, data.negative_sample_depth,
                                        data.negative_top_up),
            on_error=data.on_error,
        )
    if getattr(pairs, "negative_stats", None):
        logger.info("mined negatives: %s", ", ".join(f"{k} {v}" for k, v in pairs.negative_stats.items()))
    if data.max_samples and data.max_samples < len(pairs):
        pairs = torch.utils.data.Subset(pairs, range(data.max_samples))
    return pairs


def _precision(train_precision: str) -> dict:
    if train_precision == "auto":
        train_precision = "bf16" if torch.cuda.is_available() else "fp32"
    return {"bf16": train_precision == "bf16", "fp16": train_precision == "fp16"}


def training_arguments(config: Config, run_dir: Path, *, evaluate: bool = False):
    """The Trainer's arguments; with `evaluate`, it evaluates (val recall) every train.eval_steps."""
    from transformers import TrainingArguments

    train = config.train
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        # transformers reads warmup_steps < 1 as a fraction of the updates and >= 1 as a count: a
        # ratio of 1 (warm up through every update) goes in as the largest float below 1.
        warmup_steps=min(train.warmup_ratio, math.nextafter(1.0, 0.0)),
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.eval_steps if evaluate else None,
        report_to=list(train.report_to) or "none",
        deepspeed=train.deepspeed or None,
        seed=config.run.seed,
        data_seed=config.run.seed,
        dataloader_num_workers=config.data.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        save_only_model=False,
        use_cpu=not torch.cuda.is_available(),  # without it the Trainer ignores a CPU process group
        **_precision(train.precision),
    )


def contrastive_trainer(config: Config, embedder, args, callbacks: list, validation=None):
    """InfoNCE over the stage's training pairs: the Trainer `train_contrastive` builds by default."""
    from umarvel.training.trainer import ContrastiveTrainer, EpochResampling

    pairs = build_pairs(config)
    return ContrastiveTrainer(
        model=embedder,
        args=args,
        train_dataset=pairs,
        data_collator=PairCollator(embedder.collator, num_negatives=config.data.num_negatives),
        loss_config=config.train.loss,
        temperature_lr=config.train.temperature_learning_rate or None,
        validation=validation,
        callbacks=[EpochResampling(pairs), *callbacks],
    )


def train_contrastive(config: Config, *, resume: bool = False, force: bool = False,
                      build_trainer=contrastive_trainer, prepare=None) -> Path:
    """Run one embedder stage to completion (see `umarvel.training.runs` for re-runs).

    `build_trainer(config, embedder, args, callbacks, validation)` makes the stage's Trainer (its
    data and loss); `prepare(args)` runs once the run has started, before the model loads (stage
    3 scores its teacher there). With train.eval_steps on M-BEIR data, the saved model is the
    best by val recall (`umarvel.training.validation`).
    """
    from umarvel.modeling.adapters import gathered
    from umarvel.modeling.embedder import Embedder

    args = training_arguments(config, Path(config.run.output_dir),  # joins a launcher's process group
                              evaluate=validation.enabled(config))
    run = runs.start(config, resume=resume, force=force)
    if run.finished:
        return run.directory
    val_pool = validation.sample_val_pool(config)
    if prepare is not None:
        prepare(args)
    model_overrides = {k: v for k, v in to_dict(config.model).items() if k != "backbone"}
    embedder = Embedder.from_pretrained(config.model.backbone, trainable=True, **model_overrides)
    global_batch = config.train.per_device_batch_size * process.world_size()
    monitor = validation.Validation(val_pool, config, embedder, run.directory) if val_pool else None
    trainer = build_trainer(config, embedder, args, [], monitor)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    seconds = time.perf_counter() - started
    # Every rank takes part: under ZeRO-3 the weights are gathered from their partitions.
    embedder = trainer.embedder
    best = monitor.restore_best(embedder, trainer.state) if monitor else None
    embedder.save_pretrained(run.directory / "model", write=trainer.args.should_save)
    embedder.merge_and_save(run.directory / "merged", write=trainer.args.should_save)
    with gathered(embedder.temperature.parameters()):
        temperature = embedder.temperature.value
    metrics = {
        **result.metrics,
        "train_loss": run_loss(trainer.state.log_history),
        "global_batch": global_batch,
        "steps": trainer.state.global_step,
        "pairs": len(trainer.train_dataset),
        "temperature": temperature,
        "wall_seconds": seconds,
        **_negative_stats(trainer.train_dataset),
        **({"best": best} if best else {}),
    }
    if process.is_main_process():
        logger.info(stage_summary(run.directory.name, trainer.state.global_step, global_batch, metrics,
                                  trainer.state.log_history))
    runs.finish(run, metrics, trainer.state.log_history)
    return run.directory


def _negative_stats(pairs) -> dict:
    """What the mined-negative selection did (stage 2), for metrics.json."""
    pairs = getattr(pairs, "dataset", pairs)  # through a max_samples Subset
    stats = getattr(pairs, "negative_stats", None)
    return {"negatives": stats} if stats else {}


def stage_configs(path: str | None, overrides: list[str]) -> dict[str, Config]:
    """The resolved config of every progressive sub-stage, in order.

    Sub-stage `name` = the base config + `stages.name`, run in `<run.output_dir>/<name>`, its
    backbone the previous sub-stage's merged model (the paper changes LoRA rank between NLI
    and CC3M: merge, then attach a fresh adapter).
    """
    raw = read_raw(path, overrides)
    build_config(raw, str(path))  # every sub-stage name and key, checked before any work
    stages = raw.pop("stages", None) or {}
    if not stages:
        raise ConfigError(f"{path}: no `stages:` section; a progressive config lists nli, cc3m and mbeir")
    base_dir = Path(build_config(raw, str(path)).run.output_dir)
    configs, previous = {}, None
    for name, partial in stages.items():
        if not isinstance(partial, dict):
            raise ConfigError(f"{path}: stages.{name}: expected a mapping")
        merged = deep_merge(raw, partial)
        merged.setdefault("run", {})["output_dir"] = str(base_dir / name)
        if previous is not None:
            merged.setdefault("model", {})["backbone"] = str(base_dir / previous / "merged")
        configs[name] = build_config(merged, f"{path} (stages.{name})")
        previous = name
    return configs


def run_progressive(path: str | None, overrides: list[str], *, only: str | None = None, resume: bool = False,
                    force: bool = False) -> list[Path]:
    """NLI -> CC3M -> M-BEIR, each from the previous one's weights; finished sub-stages are skipped."""
    configs = stage_configs(path, overrides)
    names = list(configs)
    if only is not None and only not in configs:
        raise ConfigError(f"{path}: no sub-stage {only!r}; this config has {', '.join(names)}")
    done = []
    for index, name in enumerate(names):
        if only is not None and name != only:
            continue
        if index > 0 and not runs.is_done(configs[names[index - 1]].run.output_dir):
            raise UmarvelError(
                f"sub-stage {name} starts from {names[index - 1]}, which is not finished "
                f"({configs[names[index - 1]].run.output_dir} has no DONE)"
            )
        done.append(train_contrastive(configs[name], resume=resume, force=force))
    return done


def describe_global_batch(config: Config) -> str:
    per_step = config.train.per_device_batch_size * process.world_size()
    return (
        f"contrastive batch {per_step} = {config.train.per_device_batch_size} per device x {process.world_size()} devices; "
        f"gradient accumulation x{config.train.gradient_accumulation_steps} averages "
        f"{config.train.gradient_accumulation_steps} such batches per update (it adds no negatives)"
        + (f"; GradCache chunks of {config.train.loss.gradcache_chunk_size}" if config.train.loss.gradcache_chunk_size else "")
    )
