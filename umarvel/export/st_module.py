"""The sentence-transformers input module that runs an umarvel embedder inside `SentenceTransformer`.

An exported directory is a merged umarvel checkpoint with sentence-transformers' files beside it
(modules.json names this class, so loading needs `trust_remote_code=True`). The module embeds
exactly as `Embedder.encode`: the same collator (prompt template, instruction masked out of the
mean pool, the profile's rules), bidirectional attention, L2 normalisation. A sentence-transformers
prompt is our instruction, so it is given to the collator rather than glued to the text.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from sentence_transformers.base.modules import InputModule

from umarvel.errors import UmarvelError
from umarvel.modeling.embedder import EMBEDDER_CONFIG, Embedder
from umarvel.modeling.inputs import as_items

MODEL_KWARGS = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                "device_map": "device"}
"""sentence-transformers' `model_kwargs` that mean a field of our model config."""


class UmarvelEmbedding(InputModule):
    """Texts, PIL images and {text, image, instruction} dicts -> our unit vectors."""

    config_file_name = EMBEDDER_CONFIG

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder = embedder

    @property
    def modalities(self) -> list:
        # "message" lets one batch mix texts, images and pairs (sentence-transformers calls a mixed
        # batch a message batch); the collator reads every kind itself.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self):
        return self.embedder.processor.tokenizer

    def get_embedding_dimension(self) -> int:
        return self.embedder.backbone.config.get_text_config().hidden_size

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        items, _ = as_items(list(inputs), prompt or None)
        return self.embedder.collate(items)

    def forward(self, features: dict, **kwargs) -> dict:
        inputs = {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}
        features["sentence_embedding"] = self.embedder(**inputs)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """The merged checkpoint's files, written into sentence-transformers' own directory."""
        output = Path(output_path)
        with tempfile.TemporaryDirectory(dir=output, prefix=".merged.") as scratch:
            merged = self.embedder.merge_and_save(Path(scratch) / "model")
            for path in merged.iterdir():
                os.replace(path, output / path.name)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", model_kwargs: dict | None = None,
             **kwargs) -> "UmarvelEmbedding":
        directory = Path(model_name_or_path) / subfolder
        if not (directory / EMBEDDER_CONFIG).is_file():
            raise UmarvelError(f"{directory} is not an umarvel export (no {EMBEDDER_CONFIG}); umarvel reads local "
                               "directories only")
        return cls(Embedder.from_pretrained(directory, **overrides_of(model_kwargs or {})))


def overrides_of(model_kwargs: dict) -> dict:
    """Our model-config overrides for sentence-transformers' `model_kwargs`; one we cannot honour is
    an error rather than ignored."""
    unknown = sorted(set(model_kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise UmarvelError(f"model_kwargs {unknown} have no meaning for an umarvel embedder; it takes "
                           f"{sorted(MODEL_KWARGS)}")
    overrides = {}
    for key, value in model_kwargs.items():
        overrides[MODEL_KWARGS[key]] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    return overrides
