"""Encoding throughput side by side: the bare forward on pre-collated batches, `Embedder.encode`
in-process (num_workers=0), and `Embedder.encode` with input workers (the pipeline of
umarvel/modeling/batches.py); plus the input preparation alone, per worker.

    python scripts/bench_encode.py [--items 192] [--batch-size 16] [--workers 1] [--threads 1]

The default model is forward-dominated: a random Qwen2-VL of the family's architecture (text
hidden 128, 4 layers; vision tower depth 2), sized so that its CPU forward costs several ms an
item, standing in for a 7B forward on a GPU. The forward runs on `--threads` cores (1: the
"GPU"), the workers on the others. Inputs are realistic: JPEG files of 300-1000 px sides,
resized into up to 256 visual tokens (M-BEIR photos give 100-400 at the 7B's bounds), and M-BEIR-like texts (captions to passage-length). `--tiny`
uses the 2 MB test model instead (a forward too cheap to hide anything behind).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from umarvel import Embedder, backbones
from umarvel.modeling.batches import estimated_tokens, length_batches
from umarvel.tiny import build_tiny_model

# A 7B embedder on one H100 consumes roughly this many items/s (~15 ms an item at ~400 tokens).
H100_7B_ITEMS_PER_S = (60, 70)
UNIT = 28
PROMPT = {"min_pixels": 16 * UNIT * UNIT, "max_pixels": 256 * UNIT * UNIT}
WORDS = ("the a photo of man woman dog cat street city river mountain red blue green small large old new "
         "building car tree people playing standing near next to with on in under during summer winter night "
         "museum history century war king river bridge painting species bird flower found region known").split()
INSTRUCTION = "Retrieve an image and its description that answers the question."


def build_forward_model(out: Path, family: str = backbones.DEFAULT, seed: int = 0) -> Path:
    """A random checkpoint of `family` (the tiny tokenizer and processor), large enough that the
    forward dominates encoding."""
    from transformers import AutoModelForImageTextToText

    record = backbones.get(family)
    tokenizer = record.build_tokenizer()
    sizes = record.tiny_config(tokenizer).to_dict()
    text, vision = sizes["text_config"], sizes["vision_config"]
    text.pop("layer_types", None)  # derived from the layer count
    text.update(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    text["rope_parameters"]["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    vision.update(depth=2, embed_dim=64, num_heads=2, hidden_size=text["hidden_size"])
    config = type(record.tiny_config(tokenizer)).from_dict(sizes)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record.tiny_processor(tokenizer).save_pretrained(out)
    return out


def write_images(directory: Path, count: int, rng: np.random.Generator) -> list[str]:
    """JPEG photographs' stand-ins: smooth gradients, shapes and grain, sides 300-1000 px."""
    paths = []
    for i in range(count):
        width, height = (int(side) for side in rng.integers(300, 1001, size=2))
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        base = np.broadcast_to(gradient, (height, width, 3)) + rng.normal(0, 12, (height, width, 3))
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            draw.ellipse((x, y, x + width // 4, y + height // 4), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = directory / f"{i:04d}.jpg"
        image.filter(ImageFilter.GaussianBlur(1)).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def sentence(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1)))).capitalize() + "."


def make_items(n: int, images: list[str], rng: np.random.Generator) -> list[dict]:
    """M-BEIR's mix: text queries and passages (8-120 words), images, image + short text."""
    items = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            items.append({"text": sentence(rng, 8, 120), "instruction": INSTRUCTION if i % 2 else None})
        elif kind == 1:
            items.append({"image": images[i % len(images)]})
        else:
            items.append({"image": images[i % len(images)], "text": sentence(rng, 5, 20), "instruction": INSTRUCTION})
    return items


class ForwardClock:
    """Seconds spent inside a module's forward (hooks), so a run splits into model time and the
    time the model waited for its input."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._started = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "_started", time.perf_counter()))
        module.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._started))


def interleaved_best(fns: list, repeats: int, clock: ForwardClock) -> list[tuple[float, float]]:
    """Best-of-N (seconds, seconds in the forward) per function, alternating them so machine
    noise hits all alike."""
    for fn in fns:
        fn()
    best = [(float("inf"), 0.0)] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            clock.seconds = 0.0
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - start, clock.seconds))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="input workers of the pipeline run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the forward (the stand-in GPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the 2 MB test model instead of the forward-dominated one")
    parser.add_argument("--model", help="model directory (default: a fresh random model, see --tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
        elif args.tiny:
            model_dir = build_tiny_model(tmp / "tiny")
        else:
            model_dir = build_forward_model(tmp / "forward")
        emb = Embedder.from_pretrained(model_dir, prompt=PROMPT).eval()
        (tmp / "images").mkdir()
        items = make_items(args.items, write_images(tmp / "images", min(args.items, 64), rng), rng)
        bounds, unit = emb.family.pixel_bounds(emb.settings.prompt), emb.family.pixel_unit
        keys = [estimated_tokens(item, bounds, unit) for item in items]
        groups = [[items[i] for i in group] for group in length_batches(keys, args.batch_size)]
        batches = [emb.collate(group) for group in groups]
        real = sum(int(batch["attention_mask"].sum()) for batch in batches) / len(items)
        padded = sum(batch["attention_mask"].numel() for batch in batches) / len(items)
        by_text = length_batches([(item.get("image") is not None, len(item.get("text") or "")) for item in items],
                                 args.batch_size)
        padded_by_text = sum(emb.collate([items[i] for i in group])["attention_mask"].numel() for group in by_text) / len(items)

        def bare():
            with torch.inference_mode():
                for batch in batches:
                    emb.backbone(**{k: v for k, v in batch.items() if k != "pool_mask"}, use_cache=False)

        kinds = {"text": [], "image": [], "image+text": []}
        for item in items:
            kinds["image" if not item.get("text") else "image+text" if item.get("image") else "text"].append(item)
        kind_groups = {kind: [members[i : i + args.batch_size] for i in range(0, len(members), args.batch_size)]
                       for kind, members in kinds.items()}

        def prepare():
            for group in groups:
                emb.collate(group)

        def prepare_kind(kind):
            return lambda: [emb.collate(group) for group in kind_groups[kind]]

        def in_process():
            emb.encode(items, batch_size=args.batch_size, num_workers=0)

        def pipeline():
            emb.encode(items, batch_size=args.batch_size, num_workers=args.workers)

        clock = ForwardClock(emb.backbone)
        torch.set_num_threads(1)  # input preparation as one worker does it: one core
        ((t_prepare, _), *by_kind) = interleaved_best([prepare] + [prepare_kind(k) for k in kinds], args.repeats, clock)
        kind_rates = {kind: len(kinds[kind]) / seconds for kind, (seconds, _) in zip(kinds, by_kind)}
        torch.set_num_threads(args.threads)
        (t_bare, _), (t_in, f_in), (t_pipe, f_pipe) = interleaved_best([bare, in_process, pipeline], args.repeats, clock)
    rate = args.items / t_prepare
    print(f"items={args.items} batch_size={args.batch_size} forward threads={args.threads} "
          f"pipeline workers={args.workers} load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"tokens/item: {real:.0f} real, {padded:.0f} padded in batches by estimated length (text + image tokens), "
          f"{padded_by_text:.0f} padded by text length alone")
    print(f"bare forward (pre-collated):        {args.items / t_bare:8.1f} items/s  "
          f"({1000 * t_bare / args.items:.1f} ms/item)")
    for name, total, forward in (("in-process", t_in, f_in), (f"{args.workers} worker(s)", t_pipe, f_pipe)):
        print(f"Embedder.encode, {name + ':':18s} {args.items / total:8.1f} items/s  ratio to bare {t_bare / total:.3f}  "
              f"model waiting for input {100 * (total - forward) / total:4.1f}% of the time, "
              f"forward {1000 * forward / args.items:.1f} ms/item")
    print(f"with a forward that shares no core with the workers (a GPU's): worker pipeline / bare = "
          f"{t_bare / (t_bare + t_pipe - f_pipe):.3f} (bare time + the pipeline's waiting time)")
    print(f"input preparation, one worker:      {rate:8.1f} items/s  ({1000 / rate:.1f} ms/item: read, "
          "render, resize, processor); by kind: "
          + ", ".join(f"{kind} {value:.1f}/s" for kind, value in kind_rates.items()))
    low, high = H100_7B_ITEMS_PER_S
    slowest = min(kind_rates.values())
    print(f"a 7B forward on an H100 consumes ~{low}-{high} items/s: {math.ceil(high / rate)} worker(s) per GPU at "
          f"this mix, {math.ceil(high / slowest)} for a pool of the slowest kind alone (encode.num_workers; "
          "the CUDA default is min(4, cores per rank - 1))")


if __name__ == "__main__":
    main()
