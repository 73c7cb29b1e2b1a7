"""Recipes per stage: build the data, the embedder and the Trainer from a config, and run.

A contrastive run directory holds config.yaml, checkpoint-N/ (adapter + temperature +
trainer state), model/ (the final adapter), merged/ (the final merged checkpoint the next
stage starts from), log_history.json, metrics.json and, written last, DONE.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from umarvel.config import Config, ConfigError, build_config, deep_merge, read_raw, save_config, to_dict
from umarvel.data.collator import PairCollator
from umarvel.errors import UmarvelError
from umarvel.io import atomic_write_json, atomic_write_text

logger = logging.getLogger("umarvel")

DONE = "DONE"
PROGRESSIVE = ("nli", "cc3m", "mbeir")


def is_done(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).is_file()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_pairs(config: Config):
    """The training pairs of a stage's data section."""
    from umarvel.data import sources
    from umarvel.data.mbeir import MBEIR, MBEIRTrainPairs, mbeir_root, open_pool, open_queries
    from umarvel.data.tasks import GLOBAL_POOL, UNION_TRAIN_QUERIES

    data = config.data
    if not data.path:
        raise ConfigError("data.path is empty: set it to the M-BEIR root, the NLI csv or the CC3M file")
    if data.source == "nli":
        pairs = sources.NLIPairs(data.path, on_error=data.on_error)
    elif data.source == "cc3m":
        pairs = sources.CC3MPairs(data.path, data.image_root or Path(data.path).parent, on_error=data.on_error)
    else:
        root = mbeir_root(data.path)
        instructions = MBEIR(root, on_error=data.on_error).instructions
        query_file = data.train_queries or UNION_TRAIN_QUERIES
        queries = open_queries(
            root / query_file, root, instructions, upsampled=query_file == UNION_TRAIN_QUERIES, on_error=data.on_error
        )
        pool = open_pool(root / (data.pool or GLOBAL_POOL.format(split="train")), root, on_error=data.on_error)
        mined = sources.read_hard_negatives(data.hard_negatives) if data.hard_negatives else None
        pairs = MBEIRTrainPairs(
            queries,
            pool,
            seed=config.run.seed,
            use_instruction=config.model.prompt.use_instruction,
            hard_negatives=mined,
            num_negatives=data.num_negatives,
            on_error=data.on_error,
        )
    if data.max_samples and data.max_samples < len(pairs):
        pairs = torch.utils.data.Subset(pairs, range(data.max_samples))
    return pairs


def _precision(train_precision: str) -> dict:
    if train_precision == "auto":
        train_precision = "bf16" if torch.cuda.is_available() else "fp32"
    return {"bf16": train_precision == "bf16", "fp16": train_precision == "fp16"}


def training_arguments(config: Config, run_dir: Path):
    from transformers import TrainingArguments

    train = config.train
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
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


def image_start_id(embedder) -> int:
    """The token that opens an image in a row, which GradCache's chunking follows."""
    return embedder.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")


def contrastive_trainer(config: Config, embedder, args, callbacks: list):
    """InfoNCE over the stage's training pairs: the Trainer `train_contrastive` builds by default."""
    from umarvel.training.trainer import ContrastiveTrainer, EpochResampling

    pairs = build_pairs(config)
    return ContrastiveTrainer(
        model=embedder,
        args=args,
        train_dataset=pairs,
        data_collator=PairCollator(embedder.collator, num_negatives=config.data.num_negatives),
        loss_config=config.train.loss,
        image_start_id=image_start_id(embedder),
        callbacks=[EpochResampling(pairs), *callbacks],
    )


def start_run(config: Config, run_dir: Path, resume: bool) -> Path | None:
    """Record the config, seed everything; return the checkpoint to resume from, if any.

    An unfinished run is never silently restarted over its checkpoints: it needs --resume.
    """
    from transformers import set_seed

    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints and not resume:
        raise UmarvelError(f"{run_dir} holds checkpoints of an unfinished run: pass --resume to continue it, or remove it")
    if is_main_process():
        save_config(config, run_dir)
    set_seed(config.run.seed)
    return checkpoints[-1] if checkpoints else None


def train_contrastive(config: Config, *, resume: bool = False, build_trainer=contrastive_trainer) -> Path:
    """Run one embedder stage to completion; a finished run directory is left as it is.

    `build_trainer(config, embedder, args, callbacks)` makes the stage's Trainer (its data and
    loss); stage 3 passes the distillation one.
    """
    from transformers.trainer_callback import PrinterCallback

    from umarvel.modeling.embedder import Embedder
    from umarvel.training.trainer import SamplesPerSecondProgress

    run_dir = Path(config.run.output_dir)
    if is_done(run_dir):
        logger.info("%s is finished (DONE); skipping", run_dir)
        return run_dir
    latest = start_run(config, run_dir, resume)
    model_overrides = {k: v for k, v in to_dict(config.model).items() if k != "backbone"}
    embedder = Embedder.from_pretrained(config.model.backbone, trainable=True, **model_overrides)
    args = training_arguments(config, run_dir)
    global_batch = config.train.per_device_batch_size * world_size()
    trainer = build_trainer(config, embedder, args, [SamplesPerSecondProgress(global_batch)])
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(latest) if latest else None)
    seconds = time.perf_counter() - started
    if trainer.args.should_save:
        trainer.embedder.save_pretrained(run_dir / "model")
        trainer.embedder.merge_and_save(run_dir / "merged")
        atomic_write_json(run_dir / "log_history.json", trainer.state.log_history)
        metrics = dict(result.metrics)
        metrics.update(
            {
                "global_batch": global_batch,
                "steps": trainer.state.global_step,
                "pairs": len(trainer.train_dataset),
                "temperature": trainer.embedder.temperature.value,
                "wall_seconds": seconds,
            }
        )
        atomic_write_json(run_dir / "metrics.json", metrics)
        logger.info(
            "stage %s: %d steps, global batch %d, %.1f samples/s, final loss %.4f, temperature %.4f",
            run_dir.name, trainer.state.global_step, global_batch,
            metrics.get("train_samples_per_second", float("nan")), metrics.get("train_loss", float("nan")),
            metrics["temperature"],
        )
        atomic_write_text(run_dir / DONE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    _barrier()
    return run_dir


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def stage_configs(path: str | None, overrides: list[str]) -> dict[str, Config]:
    """The resolved config of every progressive sub-stage, in order.

    Sub-stage `name` = the base config + `stages.name`, run in `<run.output_dir>/<name>`, its
    backbone the previous sub-stage's merged model (the paper changes LoRA rank between NLI
    and CC3M: merge, then attach a fresh adapter).
    """
    raw = read_raw(path, overrides)
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


def run_progressive(path: str | None, overrides: list[str], *, only: str | None = None, resume: bool = False) -> list[Path]:
    """NLI -> CC3M -> M-BEIR, each from the previous one's weights; finished sub-stages are skipped."""
    configs = stage_configs(path, overrides)
    names = list(configs)
    if only is not None and only not in configs:
        raise ConfigError(f"{path}: no sub-stage {only!r}; this config has {', '.join(names)}")
    done = []
    for index, name in enumerate(names):
        if only is not None and name != only:
            continue
        if index > 0 and not is_done(configs[names[index - 1]].run.output_dir):
            raise UmarvelError(
                f"sub-stage {name} starts from {names[index - 1]}, which is not finished "
                f"({configs[names[index - 1]].run.output_dir} has no DONE)"
            )
        done.append(train_contrastive(configs[name], resume=resume))
    return done


def describe_global_batch(config: Config) -> str:
    per_step = config.train.per_device_batch_size * world_size()
    return (
        f"contrastive batch {per_step} = {config.train.per_device_batch_size} per device x {world_size()} devices; "
        f"gradient accumulation x{config.train.gradient_accumulation_steps} averages "
        f"{config.train.gradient_accumulation_steps} such batches per update (it adds no negatives)"
        + (f"; GradCache chunks of {config.train.loss.gradcache_chunk_size}" if config.train.loss.gradcache_chunk_size else "")
    )
