"""What `Embedder.encode` accepts, and the shape of what it returns (sentence-transformers style).

Inputs follow sentence-transformers: a `str` is always text (never a file name, even when a
file of that name exists: a caption may well look like a path) and a PIL image is an image.
Beyond it, a `pathlib.Path` (any os.PathLike) is an image file, and a dict is an item as the
collator reads it (`text`, `image` as a path, PIL image or list of them, `video`, optional
`instruction`; umarvel/data/prompts.py). One input given alone, not in a list, gives one
vector (1-D), as in sentence-transformers.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from umarvel.errors import DataError

SINGLE = (str, dict, Image.Image, os.PathLike)
IMAGE_TYPES = (str, Image.Image, os.PathLike)
ACCEPTED = "a str (text), a PIL image, a pathlib.Path (image file) or an item dict"


def as_items(inputs, instruction: str | None = None) -> tuple[list[dict], bool]:
    """(item dicts, whether one input was given alone). `instruction` is set on every item
    that has none of its own (queries; candidates carry no instruction). Anything else than
    the inputs the module docstring lists is a DataError saying what is accepted, never a
    vector of something else."""
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"instruction must be a str, got {type(instruction).__name__}")
    single = isinstance(inputs, SINGLE)
    if not single and (isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Iterable)):
        raise DataError(f"cannot encode a {type(inputs).__name__}; give {ACCEPTED}, or a list of them")
    values = [inputs] if single else list(inputs)
    items = [item_of(value, index) for index, value in enumerate(values)]
    if instruction is not None:
        items = [item if item.get("instruction") else {**item, "instruction": instruction} for item in items]
    return items, single


def item_of(value, index: int) -> dict:
    if isinstance(value, dict):
        check_item(value, f"input {index}")
        return value
    if isinstance(value, str):
        if not value:
            raise DataError(f"input {index}: empty text; the model embeds a non-empty text, an image or both")
        return {"text": value}
    if isinstance(value, Image.Image):
        return {"image": value}
    if isinstance(value, os.PathLike):
        path = Path(value)
        if not path.is_file():
            raise DataError(f"input {index}: image file {path} not found (a Path is read as an image; pass a str "
                            "for text)")
        return {"image": path}
    raise DataError(f"input {index}: cannot encode a {type(value).__name__}; give {ACCEPTED}")


def check_item(item: dict, where: str) -> None:
    """An item dict's fields have the types the collator reads, and it has something to encode:
    a non-empty text, an image (a path, PIL image or non-empty list of them) or a video."""
    text, image, instruction = item.get("text"), item.get("image"), item.get("instruction")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a str, got {type(text).__name__}")
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"{where}: 'instruction' must be a str, got {type(instruction).__name__}")
    if image is not None:
        images = image if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise DataError(f"{where}: 'image' is an empty list; give an image or leave the key out")
        for one in images:
            if not isinstance(one, IMAGE_TYPES):
                raise DataError(f"{where}: 'image' must be an image file path (str or pathlib.Path), a PIL image or a "
                                f"list of them, got {type(one).__name__}")
    if not text and image is None and item.get("video") is None:
        raise DataError(f"{where}: an item dict needs a text, an image or a video, got "
                        f"{ {key: item[key] for key in sorted(item)}!r:.120}")


def shaped(embeddings: torch.Tensor, *, single: bool, convert_to_numpy: bool, convert_to_tensor: bool,
           normalize_embeddings: bool):
    """The encoded (n, d) float32 CPU tensor in sentence-transformers' return conventions: a
    stacked tensor with convert_to_tensor (it wins over convert_to_numpy), else a numpy array
    with convert_to_numpy, else a list of 1-D tensors; one vector for a single input."""
    if normalize_embeddings:
        embeddings = F.normalize(embeddings, dim=-1)
    if convert_to_tensor:
        return embeddings[0] if single else embeddings
    if convert_to_numpy:
        array = embeddings.numpy()
        return array[0] if single else array
    return embeddings[0] if single else list(embeddings)


def cosine_similarity(a, b) -> torch.Tensor:
    """(len(a), len(b)) cosine similarities of two sets of embeddings (arrays or tensors, 1-D
    for one embedding)."""
    a, b = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float() for x in (a, b))
    a, b = (x.unsqueeze(0) if x.ndim == 1 else x for x in (a, b))
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
