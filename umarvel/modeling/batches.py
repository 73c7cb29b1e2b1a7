"""Inference batches that keep the accelerator busy: the one input pipeline of every encode.

Reading images, rendering prompts, resizing and the processor call cost milliseconds an item
(a 640x480 JPEG: ~5 ms decoded and processed on one core), as much as a 7B forward on an H100
consumes. Done between forwards they leave the GPU idle a third of the time, so here they run
in DataLoader worker processes while the model runs: batches are prefetched, pinned on CUDA
and copied without blocking. Items are grouped by estimated length (text and image tokens) to
limit padding, and every output row goes back to its item's place. With 0 workers the same
batches are made in-process. Every forward over a list of items (Embedder.encode, hence
evaluation, mining, reranker pairs and teacher retrieval; Reranker.score) goes through here.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from umarvel.data.images import image_size
from umarvel.errors import DataError

# Most worker processes a device gets by default: 4 prepare ~250-550 image items/s (BENCHMARKS.md),
# 4-8x what a 7B forward on an H100 consumes.
MAX_DEFAULT_WORKERS = 4
# Fewest batches for which an automatic worker starts on the CPU.
CPU_WORKER_MIN_BATCHES = 8
# Batches each worker prepares ahead of the model.
PREFETCH_BATCHES = 4
# Characters per text token, for the length estimate that forms batches (Qwen2 BPE on English).
CHARS_PER_TOKEN = 4


def default_workers(device: torch.device, batches: int) -> int:
    """Workers per process when the config says -1: on CUDA min(4, the cores this rank can spare);
    on CPU the cores that torch's intra-op threads leave free (run.cpu_threads; none at torch's
    default, where the forward already uses every core), for a set of CPU_WORKER_MIN_BATCHES or
    more, since starting a worker costs more than it saves on a few batches (BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        return max(0, min(MAX_DEFAULT_WORKERS, per_rank - 1))
    if batches < CPU_WORKER_MIN_BATCHES:
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, per_rank - torch.get_num_threads()))


def worker_count(setting: int | None, device: torch.device, batches: int) -> int:
    """Workers for one encode: the setting (None or -1: `default_workers`), never more than the
    batches after the first (a worker that starts for one batch only costs time)."""
    if setting is not None and setting < -1:
        raise ValueError(f"num_workers must be -1 (auto), 0 (in-process) or positive, got {setting}")
    wanted = default_workers(device, batches) if setting is None or setting == -1 else setting
    return max(0, min(wanted, batches - 1))


def image_area(image) -> int:
    """Pixels of an image or image file, from the header alone; 0 when it cannot be read or is
    over the pixel limit (the collator then reports the file)."""
    if isinstance(image, Image.Image):
        return image.width * image.height
    try:
        width, height = image_size(image)
    except DataError:
        return 0
    return width * height


def estimated_tokens(item: dict, pixel_bounds: tuple[int, int], pixel_unit: int) -> tuple[int, int]:
    """(media kind, estimated tokens) of an item: its text's and its images' visual tokens after
    resizing into `pixel_bounds` (`image` may be one image or a list); the sort key that groups
    items of similar length. Text-only
    items come first, then images, then videos (grouped by text length alone: their token count
    needs the file decoded)."""
    characters = len(item.get("text") or "") + len(item.get("instruction") or "")
    image = item.get("image")
    if item.get("video") is not None:
        return 2, characters // CHARS_PER_TOKEN
    if image is None:
        return 0, characters // CHARS_PER_TOKEN
    low, high = pixel_bounds
    images = image if isinstance(image, (list, tuple)) else [image]
    visual = sum(min(max(image_area(one), low), high) for one in images) // (pixel_unit * pixel_unit)
    return 1, visual + characters // CHARS_PER_TOKEN


def length_batches(keys: Sequence, batch_size: int) -> list[list[int]]:
    """Item indices sorted by key (stably) and cut into batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class _Indexed(torch.utils.data.Dataset):
    """The items with their positions, so a batch knows where its rows go."""

    def __init__(self, items: Sequence[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.items[index]


class _Failed:
    """A batch whose collation raised, carried back from the worker as a value: the DataLoader
    would otherwise re-raise it as a traceback string under another message."""

    def __init__(self, error: Exception):
        self.error = error


class SafeCollate:
    """Collate (index, item) pairs; on failure, find the failing item and describe it.

    Picklable when `collate` is (the processor is; no model or CUDA state), so it runs in workers.
    """

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self.collate = collate

    def __call__(self, indexed: list[tuple[int, dict]]):
        indices = torch.tensor([index for index, _ in indexed], dtype=torch.long)
        items = [item for _, item in indexed]
        try:
            return indices, self.collate(items)
        except Exception as err:  # noqa: BLE001 - turned into a DataError naming the item
            return _Failed(self._describe(items, err))

    def _describe(self, items: list[dict], err: Exception) -> Exception:
        culprit = next((item for item in items if _fails(self.collate, item)), None)
        if isinstance(err, DataError) and culprit is None:
            return err
        named = f"item {_name(culprit)}" if culprit is not None else f"a batch of {len(items)} items"
        if isinstance(err, DataError):
            return DataError(f"{err.message} ({named})", err.file, err.line, err.field)
        return DataError(f"cannot prepare {named} for the model: {type(err).__name__}: {err}")


def _fails(collate, item: dict) -> bool:
    try:
        collate([item])
    except Exception:  # noqa: BLE001 - only asks whether this item is the culprit
        return True
    return False


def _name(item: dict) -> str:
    """How an error names an item: its id and its files, wherever they sit in the item."""
    parts = [f"{key} {item[key]}" for key in ("qid", "did") if item.get(key)]
    for media in ("image", "video"):
        files = item.get(media) if isinstance(item.get(media), (list, tuple)) else [item.get(media)]
        parts.extend(f"{media} {file}" for file in files if isinstance(file, (str, Path)))
    for side in ("query", "candidate"):
        if isinstance(item.get(side), dict):
            parts.append(f"{side} ({_name(item[side])})")
    return ", ".join(parts) or repr(item)[:120]


def _ignore_interrupts(worker_id: int) -> None:
    """Workers ignore Ctrl-C, which the terminal sends to every process of the command: the main
    process stops and shuts them down, and a worker does not print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches(
    items: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    *,
    keys: Sequence,
    batch_size: int,
    device: torch.device,
    num_workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, dict]]:
    """(item indices, collated batch on `device`) for every batch, in order of `keys`.

    `num_workers`: worker processes (None or -1: `default_workers`, 0: in-process). A failing
    item raises the DataError its collation raised, naming it, in this process.
    """
    groups = length_batches(keys, batch_size)
    workers = worker_count(num_workers, device, len(groups))
    cuda = device.type == "cuda"
    loader = DataLoader(
        _Indexed(items), batch_sampler=groups, collate_fn=SafeCollate(collate), num_workers=workers,
        pin_memory=cuda, prefetch_factor=PREFETCH_BATCHES if workers else None,
        worker_init_fn=_ignore_interrupts if workers else None,
    )
    for out in loader:
        if isinstance(out, _Failed):
            raise out.error
        indices, batch = out
        yield indices, {key: _to(value, device, cuda) for key, value in batch.items()}


def _to(value, device: torch.device, cuda: bool):
    return value.to(device, non_blocking=cuda) if isinstance(value, torch.Tensor) else value


def encode_rows(
    forward: Callable[[dict], torch.Tensor],
    items: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    *,
    keys: Sequence,
    batch_size: int,
    device: torch.device,
    width: int,
    num_workers: int | None = None,
    bar=None,
) -> torch.Tensor:
    """(len(items), width) float32 CPU rows of `forward` over batches of the items, in item order;
    `bar` (a `umarvel.progress` bar) advances by the items of each batch."""
    out = torch.empty(len(items), width, dtype=torch.float32)
    for indices, batch in batches(items, collate, keys=keys, batch_size=batch_size, device=device,
                                  num_workers=num_workers):
        rows = forward(batch)
        out[indices] = rows.reshape(len(indices), -1).float().cpu()
        if bar is not None:
            bar.update(len(indices))
    return out
