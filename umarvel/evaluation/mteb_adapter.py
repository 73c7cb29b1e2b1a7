"""Our embedder as an mteb encoder, so `mteb.evaluate(MTEBEncoder(embedder), tasks)` runs MTEB's
and MIEB's text, image and image-text tasks on a U-MARVEL model.

mteb (an optional extra: pip install 'umarvel[mteb]') hands `encode` a DataLoader of batches,
each a dict of lists: "text" and/or "image" (PIL images), one entry per input. Queries are
encoded with the task's instruction, as our model was trained (the instruction leads the query
and is left out of the pool); candidates never carry one. The instruction is the one given for
the task's name in `instructions`, else the task's own prompt, else mteb's default for its type.
Embeddings are unit vectors, so mteb scores them by cosine.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from umarvel.errors import UmarvelError

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as err:
    raise UmarvelError("the MTEB adapter needs mteb: pip install 'umarvel[mteb]'") from err


class MTEBEncoder(AbsEncoder):
    """mteb's encoder protocol over an `Embedder`; `batch_size` overrides mteb's encode_kwargs."""

    def __init__(self, embedder, *, name: str = "umarvel/embedder", revision: str | None = None,
                 instructions: Mapping[str, str] | None = None, batch_size: int | None = None):
        self.model = embedder
        self.batch_size = batch_size
        self.prompts_dict = dict(instructions or {})
        dim = embedder.backbone.config.get_text_config().hidden_size
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": name, "revision": revision or "local", "modalities": ["image", "text"], "embed_dim": dim,
            "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": True, "framework": ["PyTorch"],
        })

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        """(n, d) float32 unit vectors of every input the DataLoader yields, in order."""
        instruction = None
        if prompt_type == PromptType.query:
            instruction = self.get_instruction(task_metadata, prompt_type) or None
        batch_size = self.batch_size or kwargs.get("batch_size") or 16
        blocks, rows = [], 0
        for batch in inputs:
            items = batch_items(batch, start=rows)
            rows += len(items)
            if items:
                blocks.append(self.model.encode(items, batch_size=batch_size, prompt=instruction,
                                                convert_to_numpy=True))
        if not blocks:
            return np.zeros((0, self.mteb_model_meta.embed_dim), np.float32)
        return np.concatenate(blocks)


def batch_items(batch: Mapping[str, list], start: int = 0) -> list[dict]:
    """An mteb batch (dict of equal-length lists) as our item dicts, one per input; an empty text
    is no text. An input with neither text nor image is an error naming its row (`start` + its
    place in the batch), never a row left out: mteb pairs vectors with inputs by position."""
    texts, images = batch.get("text"), batch.get("image")
    if texts is not None and images is not None and len(texts) != len(images):
        raise UmarvelError(f"an mteb batch has {len(texts)} texts but {len(images)} images")
    sizes = [len(column) for column in (texts, images, *batch.values())
             if column is not None and hasattr(column, "__len__") and not isinstance(column, str)]
    if not sizes:
        raise UmarvelError(f"the mteb batch from input {start} on has no text or image column (columns: "
                           f"{', '.join(sorted(batch)) or 'none'}); this encoder embeds text and images")
    size = sizes[0]
    items = [{"text": texts[i] if texts is not None and texts[i] else None,
              "image": images[i] if images is not None else None} for i in range(size)]
    for index, item in enumerate(items):
        if item["text"] is None and item["image"] is None:
            raise UmarvelError(f"mteb input {start + index} has neither a text nor an image (batch columns: "
                               f"{', '.join(sorted(batch)) or 'none'}); this encoder embeds text and images")
    return items
