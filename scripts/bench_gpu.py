"""The 7B recipe's costs on one GPU, each against the GPU's FLOP or bandwidth limit:

    python scripts/bench_gpu.py [--attn sdpa flash_attention_2] [--batches 8 32 128] [--chunk 8] [--tiny]

On CUDA it builds a random-weight Qwen2-VL with the 7B configuration (QWEN2_VL_7B below, written
out: nothing is downloaded; bf16; saved once to a scratch directory) and measures, for each
attention implementation (sdpa, and flash_attention_2 when flash_attn is installed):
  * encoding items/s at 256 and 1024 visual tokens an image (bare embedder forward, eval mode);
  * one training step (LoRA, InfoNCE over query / image pairs): time and peak memory, plain
    autograd against GradCache (`--chunk` items per forward), at per-GPU batch 8, 32, 128;
    a step that does not fit says "out of memory";
and once: exact inner-product search of 1024 queries over 1M x 3584 fp16 vectors with faiss-gpu
when installed, else with torch matmul + top-k (the line says which).
Ratios: encoding and training as model FLOP utilisation (the model's FLOPs, counted below, over
the time, over the GPU's dense bf16 peak; GradCache's extra forward is not counted as useful),
search against max(FLOP time, time to read the vectors once at the memory bandwidth). The peaks
come from PEAKS by device name; an unknown GPU gets no ratio, and the line says so.
`--tiny` runs the same code on the CPU in seconds: the 2 MB test model, small images, batches 2
and 4, 10,000 x 64 vectors, one timed repeat.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import PeakMemory, our_step  # noqa: E402

from umarvel import Embedder, backbones  # noqa: E402
from umarvel.tiny import build_tiny_model  # noqa: E402

QWEN2_VL_7B = {
    "text": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
               "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
"""Qwen/Qwen2-VL-7B-Instruct's config.json, the sizes that set compute and memory."""

# (name contains, dense bf16 TFLOPS, memory TB/s), first match wins
PEAKS = [
    ("H200", 989.0, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100 80GB PCIe", 312.0, 1.935),
    ("A100", 312.0, 1.555),
    ("L40S", 362.0, 0.864),
]
INSTRUCTION = "Retrieve an image that matches the caption."


@dataclass
class Peak:
    name: str
    tflops: float | None
    tbps: float | None

    @classmethod
    def of(cls, device: torch.device) -> Peak:
        if device.type != "cuda":
            return cls("cpu", None, None)
        name = torch.cuda.get_device_name(device)
        for part, tflops, tbps in PEAKS:
            if part in name:
                return cls(name, tflops, tbps)
        return cls(name, None, None)

    def flops_ratio(self, flops: float, seconds: float) -> str:
        if self.tflops is None:
            return f"(ratio omitted: no bf16 peak known for {self.name})"
        return f"{100 * flops / seconds / (self.tflops * 1e12):.1f}% of {self.tflops:g} TFLOPS"


@dataclass
class Sizes:
    """The FLOP count's inputs: parameters that multiply every token, and the attention shape."""

    text_params: int
    text_layers: int
    text_hidden: int
    vision_params: int
    vision_layers: int
    vision_hidden: int
    merge: int

    @classmethod
    def of(cls, embedder: Embedder) -> Sizes:
        config = embedder.backbone.config
        text, vision = config.get_text_config(), config.vision_config
        named = list(embedder.backbone.named_parameters())
        visual = sum(p.numel() for n, p in named if ".visual." in f".{n}")
        embeddings = sum(p.numel() for n, p in named if "embed_tokens" in n or "lm_head" in n)
        decoder = sum(p.numel() for n, p in named if "lora_" not in n) - visual - embeddings
        return cls(decoder, text.num_hidden_layers, text.hidden_size, visual, vision.depth, vision.embed_dim,
                   vision.spatial_merge_size)

    def forward_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """2 x parameters x tokens, plus attention's 4 x layers x width x length^2, for the decoder
        (padded length) and the vision tower (each image's patches attend to each other)."""
        rows, length = batch["input_ids"].shape
        flops = 2 * self.text_params * rows * length + 4 * self.text_layers * self.text_hidden * rows * length**2
        grid = batch.get("image_grid_thw")
        if grid is not None:
            patches = grid.prod(dim=1).double()
            flops += 2 * self.vision_params * float(patches.sum())
            flops += 4 * self.vision_layers * self.vision_hidden * float((patches**2).sum())
        return float(flops)


def build_7b_model(out: Path, device: torch.device) -> Path:
    """A random-weight Qwen2-VL-7B (the tiny tokenizer's special-token ids), bf16, saved to `out`."""
    from transformers import AutoModelForImageTextToText

    record = backbones.get("qwen2-vl")
    tokenizer = record.build_tokenizer()
    sizes = record.tiny_config(tokenizer).to_dict()
    text, vision = sizes["text_config"], sizes["vision_config"]
    text.pop("layer_types", None)  # derived from the layer count
    seven = dict(QWEN2_VL_7B["text"])
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": seven.pop("rope_theta"),
                               "mrope_section": seven.pop("mrope_section")}
    text.update(seven)
    vision.update(QWEN2_VL_7B["vision"])
    config = type(record.tiny_config(tokenizer)).from_dict(sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record.tiny_processor(tokenizer).save_pretrained(out)
    del model
    return out


def image(side: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt_for(tokens: int, unit: int) -> dict:
    """Pixel bounds that keep a square image of `tokens` visual tokens as it is."""
    return {"min_pixels": tokens * unit * unit, "max_pixels": tokens * unit * unit}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best seconds of `fn` after a warm-up."""
    best = float("inf")
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def bench_encode(embedder: Embedder, sizes: Sizes, peak: Peak, tokens: int, items: int, batch_size: int,
                 repeats: int) -> None:
    side = int(math.isqrt(tokens)) * embedder.family.pixel_unit
    batches = [embedder.collate([{"image": image(side, i + j)} for j in range(batch_size)])
               for i in range(0, items, batch_size)]
    batches = [{k: v.to(embedder.device) for k, v in b.items()} for b in batches]
    visual = int(batches[0]["image_grid_thw"][0].prod()) // sizes.merge**2
    embedder.eval()

    def run():
        with torch.inference_mode():
            for batch in batches:
                embedder.embed_batch(batch)

    seconds = timed(run, embedder.device, repeats)
    flops = sum(sizes.forward_flops(b) for b in batches)
    print(f"  encode {visual:5d} visual tokens/image, batch {batch_size:3d}: {items / seconds:9.1f} items/s  "
          f"{peak.flops_ratio(flops, seconds)}")


def bench_train(embedder: Embedder, sizes: Sizes, peak: Peak, batch: int, chunk: int, tokens: int,
                repeats: int) -> None:
    side = int(math.isqrt(tokens)) * embedder.family.pixel_unit
    rng = np.random.default_rng(batch)
    words = "a photo of the red blue dog cat street city river bridge at night in winter".split()
    queries = [{"text": " ".join(rng.choice(words, 16)), "instruction": INSTRUCTION} for _ in range(batch)]
    positives = [{"image": image(side, 1000 + i)} for i in range(batch)]
    query = {k: v.to(embedder.device) for k, v in embedder.collate(queries).items()}
    positive = {k: v.to(embedder.device) for k, v in embedder.collate(positives).items()}
    flops = 2 * (sizes.forward_flops(query) + sizes.forward_flops(positive))  # forward + input-gradient backward
    embedder.train()
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    cells = []
    for size in (0, chunk):
        def step():
            for p in trainable:
                p.grad = None
            our_step(embedder, query, positive, size)

        try:
            with PeakMemory(embedder.device) as memory:
                seconds = timed(step, embedder.device, repeats)
            cells.append(f"{'GradCache' if size else 'plain'} {seconds:7.3f} s {memory.mib / 1024:6.2f} GiB "
                         f"{peak.flops_ratio(flops, seconds)}")
        except torch.OutOfMemoryError:
            cells.append(f"{'GradCache' if size else 'plain'} out of memory")
        finally:
            for p in trainable:
                p.grad = None
            if embedder.device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"  train batch {batch:4d} ({tokens} visual tokens/image): " + " | ".join(cells))


def bench_search(device: torch.device, peak: Peak, rows: int, dim: int, queries: int, k: int, repeats: int) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    vectors = torch.randn(rows, dim, device=device, dtype=dtype, generator=generator)
    query = torch.randn(queries, dim, device=device, dtype=dtype, generator=generator)
    faiss_gpu = _faiss_gpu() if device.type == "cuda" else None
    if faiss_gpu is not None:
        faiss, resources = faiss_gpu
        config = faiss.GpuIndexFlatConfig()
        config.useFloat16, config.device = True, device.index or 0
        index = faiss.GpuIndexFlatIP(resources, dim, config)
        for start in range(0, rows, 100_000):
            index.add(vectors[start : start + 100_000].float().cpu().numpy())
        host_query = query.float().cpu().numpy()
        how = "faiss-gpu GpuIndexFlatIP (fp16 storage)"

        def search():
            index.search(host_query, k)
    else:
        how = "torch matmul + top-k (" + ("faiss-gpu not installed" if device.type == "cuda" else "CPU, --tiny") + ")"

        def search():
            for start in range(0, queries, 256):
                torch.topk(query[start : start + 256] @ vectors.T, k, dim=1)

    seconds = timed(search, device, repeats)
    flops, read = 2.0 * queries * rows * dim, rows * dim * vectors.element_size()
    line = f"  search {queries} queries, top-{k} of {rows:,} x {dim} {str(dtype).removeprefix('torch.')}: {seconds * 1000:9.1f} ms, {how}"
    if peak.tflops is None or peak.tbps is None:
        print(line + f" (ratio omitted: no peak known for {peak.name})")
        return
    limit = max(flops / (peak.tflops * 1e12), read / (peak.tbps * 1e12))
    print(line + f"; {100 * limit / seconds:.1f}% of the limit {limit * 1000:.2f} ms "
                 f"(max of {peak.tflops:g} TFLOPS, reading the vectors once at {peak.tbps:g} TB/s)")


def _faiss_gpu():
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    return faiss, faiss.StandardGpuResources()


def attention_implementations(device: torch.device, wanted: list[str]) -> list[str]:
    """The wanted ones this machine runs: flash_attention_2 needs CUDA and flash_attn."""
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    kept = [name for name in wanted if name != "flash_attention_2" or has_flash]
    for name in sorted(set(wanted) - set(kept)):
        print(f"{name}: skipped (needs CUDA and the flash_attn package)")
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128], help="per-GPU training batches")
    parser.add_argument("--chunk", type=int, default=8, help="GradCache items per forward")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", help="a saved random 7B (skips building one)")
    parser.add_argument("--tiny", action="store_true", help="CPU, the test model, small sizes: seconds")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("bench_gpu.py needs CUDA (or --tiny, the same code on the CPU at toy sizes)")
    peak = Peak.of(device)
    if args.tiny:
        encode_tokens, items, batch_sizes, batches, chunk = (4, 16), 4, (2, 2), [2, 4], 2
        args.repeats = 1
        search = (10_000, 64, 64, 10)
    else:
        encode_tokens, items, batch_sizes, batches, chunk = (256, 1024), 256, (32, 8), args.batches, args.chunk
        search = (1_000_000, 3584, 1024, 10)
    print(f"device {peak.name}" + (f" (peak {peak.tflops:g} bf16 TFLOPS, {peak.tbps:g} TB/s)" if peak.tflops else "")
          + f"; torch {torch.__version__}; load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        elif args.tiny:
            model_dir = build_tiny_model(Path(tmp) / "tiny")
        else:
            started = time.perf_counter()
            model_dir = build_7b_model(Path(tmp) / "qwen2-vl-7b-random", device)
            print(f"built and saved the random 7B in {time.perf_counter() - started:.0f} s")
        dtype = "float32" if args.tiny else "bfloat16"
        unit = backbones.get(backbones.DEFAULT).pixel_unit
        for attn in attention_implementations(device, args.attn):
            print(f"attention {attn}, {dtype}:")
            for tokens, batch_size in zip(encode_tokens, batch_sizes):
                embedder = Embedder.from_pretrained(model_dir, trainable=True, device=str(device), dtype=dtype,
                                                    attn_implementation=attn, prompt=prompt_for(tokens, unit))
                sizes = Sizes.of(embedder)
                bench_encode(embedder, sizes, peak, tokens, items, batch_size, args.repeats)
                if tokens == encode_tokens[0]:
                    for batch in batches:
                        bench_train(embedder, sizes, peak, batch, chunk, tokens, args.repeats)
                del embedder
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    bench_search(device, peak, *search, args.repeats)


if __name__ == "__main__":
    main()
