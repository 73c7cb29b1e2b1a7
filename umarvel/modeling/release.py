"""Released U-MARVEL checkpoints as they are published: their added tokens, marker rows,
temperature and directory layout (facts read from chaxjli/U-MARVEL, transformers 4.45).

The official inference adds <emb>, <instruction_start> and <instruction_end> to the base
tokenizer at every load. <emb> lands on a row the checkpoint's padded vocabulary already holds
(trained); the two marker rows are drawn afresh at random each time. Here they are a
deterministic choice instead (`marker_rows`), so two loads embed alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from umarvel import profiles
from umarvel.errors import UmarvelError
from umarvel.weights import load_tensors

TEMPERATURE_KEY = "sim.temp"  # the released checkpoints' InfoNCE temperature
MARKER_STD = 0.02  # transformers 4.45 initialises resized embedding rows with normal(0, initializer_range=0.02)


def add_release_tokens(tokenizer) -> dict[str, int]:
    """Add the release tokens (those missing, in the official order) and return their ids.

    They are added as special tokens so that dataset text spelling "<emb>" stays text.
    """
    missing = [token for token in profiles.RELEASE_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in profiles.RELEASE_TOKENS}


def marker_rows(spec: str, hidden: int, count: int = 2) -> torch.Tensor:
    """(count, hidden) float32 rows: 'seed:N' draws normal(0, 0.02) with seed N; otherwise
    `spec` is a .npy or .safetensors file (one tensor) holding at least `count` rows."""
    source = profiles.marker_source(spec)
    if isinstance(source, int):
        generator = torch.Generator().manual_seed(source)
        return torch.normal(0.0, MARKER_STD, (count, hidden), generator=generator)
    path = source
    if path.suffix == ".npy":
        rows = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        tensors = load_tensors(path, "it is named by model.rules.marker_rows: give a whole file")
        if len(tensors) != 1:
            raise UmarvelError(f"model.rules.marker_rows: {path} holds {len(tensors)} tensors, expected one")
        rows = next(iter(tensors.values()))
    if rows.ndim != 2 or rows.shape[0] < count or rows.shape[1] != hidden:
        raise UmarvelError(f"model.rules.marker_rows: {path} has shape {tuple(rows.shape)}, expected ({count}, {hidden})")
    return rows[:count].float()


def prepare_backbone(backbone, tokenizer, spec: str) -> dict[str, int]:
    """Add the release tokens to `tokenizer` and give the backbone their rows: markers from
    `spec`; <emb> keeps the checkpoint's row, or (vocabulary too small, so resized) takes a
    third row of the draw (or of the file). Returns the token ids.

    'mean' puts every fresh row at the mean of the rows before the first of them: what
    transformers >= 4.46 draws when the official load resizes one token at a time
    (mean_resizing: a normal around that mean with the rows' covariance scaled by 1e-9, so
    within ~1e-4 of a row's spread of it), the Qwen3-VL release's load under 4.57."""
    before = backbone.get_input_embeddings().num_embeddings
    ids = add_release_tokens(tokenizer)
    if len(tokenizer) > before:
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = backbone.get_input_embeddings().weight
    fresh = [ids[profiles.INSTRUCTION_START], ids[profiles.INSTRUCTION_END]]
    if ids[profiles.EMB_TOKEN] >= before:
        fresh.append(ids[profiles.EMB_TOKEN])
    if profiles.marker_source(spec) == profiles.MEAN_MARKERS:
        rows = weight[: min(fresh)].detach().float().mean(0).expand(len(fresh), -1)
    else:
        rows = marker_rows(spec, weight.shape[1], count=len(fresh))
    with torch.no_grad():
        weight[fresh] = rows.to(weight.device, weight.dtype)
    return ids


def checkpoint_temperature(directory: str | Path) -> float | None:
    """The `sim.temp` weight of a released checkpoint directory, None when it has none."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(TEMPERATURE_KEY)
        files = [directory / shard] if shard else []
    else:
        files = sorted(directory.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if TEMPERATURE_KEY in handle.keys():
                return float(handle.get_tensor(TEMPERATURE_KEY).float().reshape(-1)[0])
    return None


def architectures(directory: str | Path) -> list[str]:
    """config.json's architectures of a model directory (empty when it names none)."""
    return json.loads((Path(directory) / "config.json").read_text()).get("architectures") or []
