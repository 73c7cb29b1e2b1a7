"""Stage 3, distillation (paper 3.3, Finding 6): the stage-2 embedder continues training on
KL(softmax(teacher) || softmax(student)) over each sampled query's teacher-scored candidates.

`umarvel distill` first computes the teacher file (`umarvel.retrieval.teacher`: resumable,
split across ranks), then trains the embedder in `model.backbone` with the contrastive stages'
run directory (config.yaml, checkpoint-N/, model/, merged/, log_history.json, metrics.json,
DONE), so `umarvel eval mbeir --model <run dir>` reads the result.

Teacher temperature: the fused score S = a*cos + (1-a)*P(YES) lives on the cosine's scale, so
its softmax needs a temperature of the student's order, not 1 (which would give a nearly
uniform target). `distill.teacher_temperature` 0 takes the student's own temperature at each
step, detached, as the reference implementation does: with alpha = 1 the teacher is then the
recall model's own distribution, the loss starts near zero, and only the reranker's opinion
moves the student. A positive value fixes the scale instead.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from umarvel.config import Config, ConfigError
from umarvel.data.collator import DistillCollator
from umarvel.data.mbeir import MBEIRDistillSet
from umarvel.data.sources import read_teacher_scores
from umarvel.retrieval.teacher import TeacherScoring, teacher_path
from umarvel.training.losses import distillation_kl
from umarvel.training.rerank import training_data
from umarvel.training.stages import train_contrastive
from umarvel.training.trainer import ContrastiveTrainer, EpochResampling

logger = logging.getLogger("umarvel")


class DistillationTrainer(ContrastiveTrainer):
    """ContrastiveTrainer on DistillCollator batches: the loss is `distillation_kl` between the
    batch's teacher scores and the student's cosines, through GradCache when configured."""

    def __init__(self, *args, teacher_temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_temperature = teacher_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_scores = inputs["teacher_scores"]

        def loss_fn(embeddings, temperature):
            return distillation_kl(
                embeddings["query"],
                embeddings["candidate"],
                teacher_scores,
                temperature,
                teacher_temperature=self.teacher_temperature or float(temperature.detach()),
            )

        batches = {name: inputs[name] for name in ("query", "candidate")}
        return self.embedded_loss(model, batches, loss_fn, return_outputs)


def distillation_trainer(config: Config, embedder, args, callbacks: list, validation=None, *, queries,
                         pool) -> DistillationTrainer:
    """The Trainer over the teacher file's queries, for `train_contrastive`."""
    samples = MBEIRDistillSet(queries, pool, read_teacher_scores(teacher_path(config)), seed=config.run.seed,
                              use_instruction=config.model.prompt.use_instruction)
    return DistillationTrainer(
        model=embedder,
        args=args,
        train_dataset=samples,
        data_collator=DistillCollator(embedder.collator),
        loss_config=config.train.loss,
        teacher_temperature=config.distill.teacher_temperature,
        temperature_lr=config.train.temperature_learning_rate or None,
        validation=validation,
        callbacks=[EpochResampling(samples), *callbacks],
    )


def check_distill_config(config: Config) -> None:
    """What the stage needs beyond the schema's ranges (config.py checks those when it is built)."""
    settings = config.distill
    if config.data.source != "mbeir" or not config.data.path:
        raise ConfigError("distillation trains on M-BEIR: set data.source=mbeir and data.path to the M-BEIR root")
    if not settings.reranker:
        raise ConfigError("distill.reranker is empty: set it to the reranker run (e.g. runs/umarvel/reranker)")


def distill(config: Config, *, resume: bool = False, force: bool = False) -> Path:
    """Score the teacher (once, resumable, the ranks sharing the work), then train the student."""
    from umarvel.modeling.model_dir import EMBEDDER, RERANKER, locate

    check_distill_config(config)
    queries, pool = training_data(config)

    def score_teacher(args) -> None:
        recall_dir = locate(config.distill.recall_model or config.model.backbone, EMBEDDER)
        TeacherScoring(config, queries, pool, recall_dir, locate(config.distill.reranker, RERANKER),
                       device=str(args.device)).run()

    return train_contrastive(config, resume=resume, force=force, prepare=score_teacher,
                             build_trainer=partial(distillation_trainer, queries=queries, pool=pool))
