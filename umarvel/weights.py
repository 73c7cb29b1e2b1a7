"""Weight files read with errors that name the file.

A truncated copy, or a shard the index names but the directory lacks, otherwise surfaces as a
safetensors header error or a FileNotFoundError deep inside from_pretrained, naming neither the
file nor what to do. Opening a safetensors file reads only its header (and checks that the data
it describes is all there), so checking before loading costs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from umarvel.errors import UmarvelError

SAVED_MODEL = "the saved model is damaged or incomplete: save or train it again"
CHECKPOINT = "the checkpoint is damaged or incomplete: resume from an earlier one, or pass --force to train again"
MODEL_DIR = "the model directory is damaged or incomplete: copy or download it again"
SHARD_INDEX = "model.safetensors.index.json"


def check_safetensors(path: Path, hint: str) -> None:
    """`path` is a whole safetensors file, or a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UmarvelError(f"{path}: missing; {hint}")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise UmarvelError(f"{path}: not a whole safetensors file ({err}); {hint}") from None


def load_tensors(path: Path, hint: str) -> dict:
    """The tensors of a checked safetensors file."""
    from safetensors.torch import load_file

    check_safetensors(path, hint)
    return load_file(path)


def check_model_weights(directory: Path, hint: str = MODEL_DIR) -> None:
    """Every weight file of a model directory is whole: the shards its index names, else each
    *.safetensors file."""
    index = directory / SHARD_INDEX
    if not index.is_file():
        for file in sorted(directory.glob("*.safetensors")):
            check_safetensors(file, hint)
        return
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UmarvelError(f"{index}: not a readable shard index ({type(err).__name__}: {err}); {hint}") from None
    for shard in shards:
        if not (directory / shard).is_file():
            raise UmarvelError(f"{index} names the shard {shard}, which is missing from {directory}; {hint}")
        check_safetensors(directory / shard, hint)
