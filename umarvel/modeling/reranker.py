"""The U-MARVEL reranker: a generative backbone (LM head, LoRA, frozen vision tower) that reads
a query and ONE candidate and answers YES or NO; its score is P(YES) (paper 3.3).

P(YES) is normalised over the two answers only: the softmax of the YES and NO logits of the
answer's first token, at the position after the assistant prompt. The vocabulary-sized logits
are computed at that one position per row, never for the whole sequence.

A saved reranker directory holds `reranker_config.json` (the model section it was trained
with), the processor files and a PEFT adapter whose backbone is the directory named there
(absolute, and relative to the adapter).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from umarvel.config import ConfigError, ModelConfig, to_dict
from umarvel.data.rerank import IGNORED_LABEL, RerankCollator, answer_token_ids
from umarvel.errors import UmarvelError
from umarvel.io import atomic_write_json
from umarvel.modeling import batches
from umarvel.modeling.adapters import AdaptedBackbone, backbone_record
from umarvel.modeling.model_dir import RERANKER, RERANKER_CONFIG, ModelDirectory
from umarvel.progress import progress_bar
from umarvel.weights import CHECKPOINT, load_tensors

FORMAT_VERSION = RERANKER.version


@dataclass
class RerankOutput(ModelOutput):
    """Answer-position logits over the vocabulary (rows, vocab), and the loss when labelled."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Reranker(AdaptedBackbone):
    """Score (query, candidate) pairs with P(YES); train on the answer token's next-token loss."""

    saved_as = RERANKER
    record, kind = RERANKER.record, RERANKER.name
    generative = True

    # The loss is a mean over rows (one answer token each): the Trainer divides by accumulation.
    accepts_loss_kwargs = False

    def __init__(self, backbone, processor, config: ModelConfig):
        super().__init__()
        if config.attention != "causal":
            raise ConfigError(
                "the reranker answers by next-token prediction and must read causally: set model.attention=causal"
            )
        self.backbone, self.processor, self.settings = backbone, processor, config
        self.source: Path | None = None  # the directory from_pretrained read, for reports
        self.answer_ids = answer_token_ids(processor.tokenizer)
        self.collator = RerankCollator(processor, config.prompt, self.family, self.answer_ids)
        if config.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ----- construction -------------------------------------------------------------------
    def _loaded_from(self, directory: ModelDirectory) -> None:
        self.source = directory.path

    # ----- forward and scoring ------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels=None, **multimodal) -> RerankOutput:
        """Logits of the token after each row's prompt; with `labels` (one labelled token per row,
        as RerankCollator makes them) the logits that predict it, and their cross-entropy."""
        if labels is None:
            rows = torch.arange(len(input_ids), device=input_ids.device)
            predicting = attention_mask.sum(dim=1) - 1
        else:
            rows, answer_at = (labels != IGNORED_LABEL).nonzero(as_tuple=True)
            if not torch.equal(rows, torch.arange(len(input_ids), device=rows.device)):
                raise UmarvelError("reranker labels must mark exactly one answer token per row")
            predicting = answer_at - 1
        model = self.backbone.get_base_model() if self.has_adapter else self.backbone
        inputs = {k: v for k, v in multimodal.items() if k in self.family.model_inputs and v is not None}
        with self.vision_on_every_rank("pixel_values" in inputs):
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 **inputs).last_hidden_state
        logits = model.lm_head(hidden[rows, predicting]).float()
        loss = None if labels is None else F.cross_entropy(logits, labels[rows, answer_at])
        return RerankOutput(logits=logits, loss=loss)

    def yes_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(YES) from answer-position logits, normalised over the YES and NO tokens."""
        pair = logits[:, [self.answer_ids["YES"], self.answer_ids["NO"]]]
        return pair.softmax(dim=-1)[:, 0]

    @torch.inference_mode()
    def score(self, pairs: list[tuple[dict, dict]], batch_size: int = 16, show_progress: bool = False, *,
              num_workers: int | None = None) -> torch.Tensor:
        """P(YES) of every (query, candidate) pair, float32 on CPU, in the given order.

        Pairs are batched by length to limit padding, prepared by `num_workers` worker processes
        (as in Embedder.encode); a row's score does not depend on its batch.
        """
        was_training = self.training
        self.eval()
        bounds, unit = self.family.pixel_bounds(self.settings.prompt), self.family.pixel_unit
        examples = [{"query": query, "candidate": candidate} for query, candidate in pairs]
        keys = [tuple(map(sum, zip(*(batches.estimated_tokens(item, bounds, unit) for item in pair)))) for pair in pairs]
        with progress_bar(len(pairs), "rerank", "pair", enabled=show_progress) as bar:
            try:
                scores = batches.encode_rows(
                    lambda batch: self.yes_probability(self(**batch).logits), examples, self.collator, keys=keys,
                    batch_size=batch_size, device=self.device, width=1, num_workers=num_workers, bar=bar,
                )
            finally:
                self.train(was_training)
        return scores[:, 0]

    # ----- saving -------------------------------------------------------------------------
    def _write_files(self, directory: Path) -> None:
        record = {"format_version": FORMAT_VERSION, "model": to_dict(self.settings)}
        atomic_write_json(directory / RERANKER_CONFIG, {**record, **backbone_record(self.settings.backbone, directory)})
        self.processor.save_pretrained(directory)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load a saved adapter's weights into this reranker (resume)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.backbone, load_tensors(Path(directory) / "adapter_model.safetensors", CHECKPOINT))

    def save_pretrained(self, directory: str | os.PathLike, *, write: bool = True) -> Path:
        """Collective under ZeRO-3, like `write_adapter`."""
        return self.write_adapter(directory, write=write, atomic=True)

