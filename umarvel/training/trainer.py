"""A transformers.Trainer for contrastive embedding training (no copied inner loop).

The Trainer keeps its own loop, DDP/DeepSpeed wrapping, accumulation, scheduling, checkpoints
and resume; we supply the loss (InfoNCE, optionally through GradCache), optimizer groups that
give the temperature its own group (no decay, its own rate), checkpoints that are loadable
embedder directories, logs that carry the temperature and in-batch accuracy
(`umarvel.training.telemetry` adds samples/s, the log lines and log_history.json), and, with
a `Validation`, val recall every `eval_steps` (`umarvel.training.validation`).
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from umarvel.config import LossConfig
from umarvel.training.gradcache import embed_and_compute_loss
from umarvel.training.losses import CandidateIds, info_nce
from umarvel.training.telemetry import TelemetryTrainer
from umarvel.training.validation import Validation

EMBEDDED = ("query", "positive", "negative")


class EpochResampling(TrainerCallback):
    """Tell the dataset the epoch, so per-epoch draws (positive, negatives, instruction) change."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class ContrastiveTrainer(TelemetryTrainer):
    """Trainer whose model is an `Embedder` and whose batches come from `PairCollator`."""

    def __init__(self, *args, loss_config: LossConfig, temperature_lr: float | None = None,
                 validation: Validation | None = None, **kwargs):
        super().__init__(*args, eval_dataset=validation.pool if validation else None, **kwargs)
        self.loss_config = loss_config
        self.temperature_lr = temperature_lr
        self.validation = validation
        if validation is not None:
            self.add_callback(validation)
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean: the Trainer divides by accumulation

    @property
    def embedder(self):
        return self.accelerator.unwrap_model(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args)
            groups = self.embedder.parameter_groups(self.args.weight_decay, self.temperature_lr)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.loss_config
        ids = CandidateIds(**inputs["ids"]) if config.mask_false_negatives else None

        def loss_fn(embeddings, temperature):
            return info_nce(
                embeddings["query"],
                embeddings["positive"],
                temperature,
                negatives=embeddings.get("negative"),
                negatives_scope=config.negatives_scope,
                bidirectional=config.bidirectional,
                ids=ids,
                in_batch_negatives=config.in_batch_negatives,
            )

        batches = {name: inputs[name] for name in EMBEDDED if name in inputs}
        return self.embedded_loss(model, batches, loss_fn, return_outputs)

    def embedded_loss(self, model, batches: dict, loss_fn, return_outputs: bool = False):
        """`loss_fn` on the embeddings of the named `batches` (through GradCache when the loss
        config sets a chunk size or token budget), its statistics kept for the next log line."""
        output = embed_and_compute_loss(
            lambda batch: model(**batch),
            batches,
            loss_fn,
            self.embedder.temperature(),
            chunk_size=self.loss_config.gradcache_chunk_size,
            chunk_tokens=self.loss_config.gradcache_chunk_tokens,
            parameters=[p for p in model.parameters() if p.requires_grad],
            split=self._split_batch,
        )
        self.record(output.stats)
        return (output.loss, output.stats) if return_outputs else output.loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's evaluation (every `eval_steps` and after the last step, on every rank):
        the val pool's recall, logged, and the model kept when it is the best so far."""
        metrics = self.validation.measure(self.embedder, metric_key_prefix)
        self.log(dict(metrics))  # a copy: `log` adds the epoch to what it is given
        self.validation.keep_if_best(self.embedder, self.state, metrics, write=self.args.should_save)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _split_batch(self, batch: dict, size: int) -> list[dict]:
        """GradCache chunks, the backbone family's way (images follow their rows)."""
        family = self.embedder.family
        return family.split_batch(batch, size, family.vision_start_id(self.embedder.processor.tokenizer))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every rank comes here (`save_model`); the adapter is gathered from the live parameters
        (ZeRO-3 partitions them, and the Trainer's `state_dict` is empty when
        stage3_gather_16bit_weights_on_model_save is false); the saving process writes."""
        self.embedder.write_adapter(output_dir or self.args.output_dir, write=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume without DeepSpeed; under DeepSpeed the Trainer loads the engine's own checkpoint
        (global_stepN/ in checkpoint-N), which restores the partitioned adapter and optimizer."""
        self.embedder.load_adapter_weights(resume_from_checkpoint)


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
