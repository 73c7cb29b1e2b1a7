"""Peak memory and step time of one contrastive training step against the batch size, with and
without GradCache, side by side in one run (tiny model, CPU):

    python scripts/bench_train.py [--batches 8 16 32 64] [--chunk 8] [--repeats 2]

Peak memory is the process's peak RSS above its RSS before the step (Linux VmHWM, reset through
/proc/self/clear_refs before every measurement). With GradCache the activation memory is one
chunk's, so its peak should stay nearly flat as the batch grows.
"""
from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from umarvel import Embedder
from umarvel.data.collator import PairCollator
from umarvel.tiny import build_tiny_model
from umarvel.training.gradcache import embed_and_compute_loss
from umarvel.training.losses import CandidateIds, info_nce

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "yellow", "grey"]


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def examples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        image = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(image).ellipse((10 + i % 30, 10, 60 + i % 30, 60), fill=colour)
        out.append({
            "query": {"qid": f"9:{i}", "text": f"a {colour} circle number {i} on a white background",
                      "instruction": "Retrieve the image that matches the caption."},
            "positive": {"did": f"9:{i}", "image": image},
            "negatives": [],
        })
    return out


def step(embedder, batch, chunk: int, image_start: int) -> None:
    embedder.zero_grad(set_to_none=True)
    ids = CandidateIds(**batch["ids"])
    out = embed_and_compute_loss(
        embedder.embed_batch,
        {"query": batch["query"], "positive": batch["positive"]},
        lambda e, t: info_nce(e["query"], e["positive"], t, ids=ids),
        embedder.temperature(),
        chunk_size=chunk,
        parameters=[p for p in embedder.parameters() if p.requires_grad],
        split=lambda b, n: embedder.family.split_batch(b, n, image_start),
    )
    out.loss.backward()


def measure(embedder, batch, chunk: int, image_start: int, repeats: int) -> tuple[float, float]:
    """(best seconds, peak MiB above the starting RSS) of one training step."""
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        gc.collect()
        before = _status_kib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        step(embedder, batch, chunk, image_start)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, (_status_kib("VmHWM") - before) / 1024)
    return best, peak


def run_one(model_dir: str, size: int, chunk: int, repeats: int) -> None:
    """Measure one (batch size, chunk) in this fresh process and print 'seconds MiB'."""
    torch.manual_seed(0)
    embedder = Embedder.from_pretrained(model_dir, trainable=True, prompt={"max_pixels": 112 * 112})
    embedder.train()
    image_start = embedder.family.vision_start_id(embedder.processor.tokenizer)
    batch = PairCollator(embedder.collator)(examples(size))
    seconds, mib = measure(embedder, batch, chunk, image_start, repeats)
    print(f"{seconds} {mib}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.repeats)
        return
    print(f"threads={torch.get_num_threads()} chunk={args.chunk}; each figure from a fresh process; "
          "peak = RSS high-water mark above the pre-step RSS")
    print(f"{'batch':>6s} {'plain s':>9s} {'plain MiB':>10s} {'cached s':>9s} {'cached MiB':>11s} {'time x':>7s} {'memory x':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "tiny"))
        for size in args.batches:
            (plain_s, plain_mib), (cached_s, cached_mib) = (
                _measure_in_subprocess(model_dir, size, chunk, args.repeats) for chunk in (0, args.chunk)
            )
            print(f"{size:6d} {plain_s:9.3f} {plain_mib:10.1f} {cached_s:9.3f} {cached_mib:11.1f} "
                  f"{cached_s / plain_s:7.2f} {cached_mib / max(plain_mib, 1e-9):9.2f}")


def _measure_in_subprocess(model_dir: str, size: int, chunk: int, repeats: int) -> tuple[float, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--one", model_dir, str(size), str(chunk), "--repeats", str(repeats)],
        capture_output=True, text=True, check=True,
    )
    seconds, mib = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(mib)


if __name__ == "__main__":
    main()
