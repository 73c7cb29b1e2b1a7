"""One contrastive training step with GradCache, ours against sentence-transformers', side by side:

    python scripts/bench_peer.py [--batch 32] [--chunk 8] [--repeats 2] [--rounds 2] [--threads 1] [--device auto] [--tiny]

Both sides train the same model (a random Qwen2-VL of the family's architecture, text hidden 128,
4 layers, as in scripts/bench_encode.py; `--tiny`: the 2 MB test model) with its LoRA adapter on
the same collated batch of image + text pairs (a captioned query, a photo of 300-1000 px sides
resized into up to 256 visual tokens), chunked the same way (`--chunk` items per forward):
  ours:   `embed_and_compute_loss` (umarvel/training/gradcache.py) with InfoNCE at temperature 0.05;
  theirs: sentence-transformers' `CachedMultipleNegativesRankingLoss(mini_batch_size=--chunk)`
          (scale 20 = 1 / 0.05, cosine) around the same embedder, wrapped as our export does
          (umarvel/export/st_module.py), one `loss.backward()`.
Each side runs in fresh processes, the sides alternating (--rounds; in each a warm-up step, then
best of --repeats); the parent prints
samples/s and the peak memory of a step above the memory before it, the largest over the steps
(the first included): on CUDA the allocator's peak (max_memory_allocated), on CPU the process's
RSS high-water mark (VmHWM, reset through /proc/self/clear_refs), where only the first step of a
fresh process shows its full need: later ones reuse what the allocator kept mapped. It also checks that both sides compute the same loss and gradients.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import INSTRUCTION, PROMPT, build_forward_model, sentence, write_images  # noqa: E402

from umarvel import Embedder  # noqa: E402
from umarvel.tiny import build_tiny_model  # noqa: E402
from umarvel.training.gradcache import embed_and_compute_loss  # noqa: E402
from umarvel.training.losses import info_nce  # noqa: E402

TEMPERATURE = 0.05
SIDES = ("ours", "sentence-transformers")
TINY_PROMPT = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}  # --tiny: images of 4-16 visual tokens


def pairs(n: int, images: list[str], rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Queries (instruction + caption) and their positives (a photo with a short text)."""
    queries = [{"text": sentence(rng, 8, 30), "instruction": INSTRUCTION} for _ in range(n)]
    positives = [{"image": images[i % len(images)], "text": sentence(rng, 3, 10)} for i in range(n)]
    return queries, positives


class PeakMemory:
    """Peak memory of a block above the memory before it, in MiB: CUDA allocator or process RSS."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = (peak - self.before) / 2**20


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def our_step(embedder: Embedder, query: dict, positive: dict, chunk: int) -> torch.Tensor:
    family, tokenizer = embedder.family, embedder.processor.tokenizer
    start = family.vision_start_id(tokenizer)
    output = embed_and_compute_loss(
        embedder.embed_batch,
        {"query": query, "positive": positive},
        lambda e, t: info_nce(e["query"], e["positive"], t),
        torch.tensor(TEMPERATURE),
        chunk_size=chunk,
        parameters=[p for p in embedder.parameters() if p.requires_grad],
        split=lambda batch, size: family.split_batch(batch, size, start),
    )
    output.loss.backward()
    return output.loss.detach()


def their_step(loss_module, query: dict, positive: dict) -> torch.Tensor:
    loss = loss_module([query, positive], torch.zeros(0))
    loss.backward()
    return loss.detach()


def run_side(side: str, model_dir: str, batch: int, chunk: int, repeats: int, device: str, seed: int,
             prompt: dict = PROMPT) -> dict:
    """Measure one side in this process: best seconds, peak MiB, loss and gradients' fingerprint."""
    torch.manual_seed(seed)
    embedder = Embedder.from_pretrained(model_dir, trainable=True, prompt=prompt, device=device)
    embedder.train()
    rng = np.random.default_rng(seed)
    images = sorted(str(p) for p in (Path(model_dir).parent / "images").glob("*.jpg"))
    queries, positives = pairs(batch, images, rng)
    query = {k: v.to(embedder.device) for k, v in embedder.collate(queries).items()}
    positive = {k: v.to(embedder.device) for k, v in embedder.collate(positives).items()}
    if side == "ours":
        step = lambda: our_step(embedder, query, positive, chunk)  # noqa: E731
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        from umarvel.export.st_module import UmarvelEmbedding

        model = SentenceTransformer(modules=[UmarvelEmbedding(embedder)], device=str(embedder.device))
        model.train()
        loss_module = CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=chunk)
        step = lambda: their_step(loss_module, query, positive)  # noqa: E731
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    best, peak, loss = float("inf"), 0.0, None
    for attempt in range(repeats + 1):  # the first is a warm-up
        for p in trainable:
            p.grad = None
        torch.manual_seed(seed)  # the same LoRA dropout draws on both sides
        with PeakMemory(embedder.device) as memory:
            started = time.perf_counter()
            loss = step()
            if embedder.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        peak = max(peak, memory.mib)  # the warm-up's too: on CPU a later step reuses what it left mapped
        if attempt:
            best = min(best, seconds)
    gradient = torch.cat([p.grad.flatten().float().cpu() for p in trainable if p.grad is not None])
    return {"seconds": best, "mib": peak, "loss": float(loss), "gradient": gradient.tolist(),
            "tokens": int(query["attention_mask"].sum() + positive["attention_mask"].sum()),
            "device": str(embedder.device)}


def measure(side: str, args, model_dir: str) -> dict:
    """One side's figures, from a fresh process (`--tiny`: this one, for speed; its memory figures
    then include what the other side left allocated)."""
    if args.tiny:
        return run_side(side, model_dir, args.batch, args.chunk, args.repeats, args.device, 0, TINY_PROMPT)
    command = [sys.executable, __file__, "--one", side, model_dir, "--batch", str(args.batch), "--chunk",
               str(args.chunk), "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="image + text pairs in the step")
    parser.add_argument("--chunk", type=int, default=8, help="items per forward, both sides")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side, alternating sides")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--tiny", action="store_true",
                        help="the 2 MB test model, 4 pairs, small images, chunks of 2, in this process: seconds")
    parser.add_argument("--one", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_side(args.one[0], args.one[1], args.batch, args.chunk, args.repeats, args.device, 0)))
        return
    if args.tiny:
        args.batch, args.chunk, args.repeats, args.rounds = 4, 2, 1, 1
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model") if args.tiny else build_forward_model(tmp / "model")
        (tmp / "images").mkdir()
        write_images(tmp / "images", min(args.batch, 16), np.random.default_rng(1))
        runs = {side: [] for side in SIDES}
        for round_ in range(args.rounds):  # alternating, so a change in the machine's load hits both sides
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                runs[side].append(measure(side, args, str(model_dir)))
        ours, theirs = (min(runs[side], key=lambda run: run["seconds"]) for side in SIDES)
    gradients = np.array(ours["gradient"]), np.array(theirs["gradient"])
    gradient_gap = float(np.abs(gradients[0] - gradients[1]).max() / max(np.abs(gradients[1]).max(), 1e-12))
    print(f"one training step, {args.batch} image+text pairs ({ours['tokens']} tokens), GradCache chunks of "
          f"{args.chunk} items, device {ours['device']}, {args.threads} thread(s), load {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; best of {args.repeats} after a warm-up, "
          + ("both sides in this process" if args.tiny else f"best of {args.rounds} fresh processes per side, alternating"))
    print(f"{'side':24s} {'samples/s':>10s} {'step s':>8s} {'peak MiB':>9s} {'loss':>9s}")
    for name, side in zip(SIDES, (ours, theirs)):
        print(f"{name:24s} {args.batch / side['seconds']:10.2f} {side['seconds']:8.3f} {side['mib']:9.1f} "
              f"{side['loss']:9.5f}")
    memory = (f"{ours['mib'] / theirs['mib']:.3f}x" if min(ours["mib"], theirs["mib"]) >= 1
              else "not comparable (a peak under 1 MiB)")
    print(f"ours / sentence-transformers: speed {theirs['seconds'] / ours['seconds']:.3f}x, peak memory {memory}")
    print(f"same step: loss difference {abs(ours['loss'] - theirs['loss']):.2e}, largest gradient difference "
          f"{gradient_gap:.2e} of the largest gradient")


if __name__ == "__main__":
    main()
