"""The whole M-BEIR evaluation against the bare encoder, on the same items.

Pipeline: `MBEIREvaluator.evaluate` over all 16 rows into a fresh embedding cache (encode every
test query set and local pool, write fp16 shards, search the local and/or the global pool,
score, write results and run files). Bare: `Embedder.encode` on the same item lists, set by set,
with the same batch size. Both as items/s over the same item count, and their ratio: what
caching, search, scoring and reporting cost on top of encoding. Runs alternate so machine
noise hits both alike; each side's fastest run counts. The parsed-table cache is warm (a
first run builds it), the embedding cache never is.

    python scripts/bench_eval.py [--size small] [--pool both] [--batch-size 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="small", help="synthetic benchmark size")
    parser.add_argument("--pool", choices=["local", "global", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="model directory (default: a fresh tiny Qwen2-VL)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_eval.") as tmp:
        os.environ["UMARVEL_CACHE"] = str(Path(tmp) / "cache")  # before umarvel reads it
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    from umarvel import Embedder
    from umarvel.config import EncodeConfig, MBEIREvalConfig
    from umarvel.data.mbeir import MBEIR
    from umarvel.data.synthetic import write_synthetic
    from umarvel.data.tasks import EVAL_ROWS
    from umarvel.evaluation.mbeir import POOLS, MBEIREvaluator
    from umarvel.tiny import build_tiny_model

    torch.manual_seed(0)
    model_dir = Path(args.model) if args.model else build_tiny_model(tmp / "tiny")
    root = write_synthetic(tmp / "synthetic", seed=0, size=args.size)
    embedder = Embedder.from_pretrained(model_dir).eval()
    pools = POOLS if args.pool == "both" else (args.pool,)
    mbeir = MBEIR(root, progress=False)
    use_instruction = embedder.settings.prompt.use_instruction
    # All 16 rows: the evaluator encodes every row's test queries and every local pool.
    item_sets = [list(mbeir.queries("test", row).items(use_instruction=use_instruction)) for row in EVAL_ROWS]
    item_sets += [list(mbeir.local_pool(row).items()) for row in EVAL_ROWS]
    count = sum(len(items) for items in item_sets)

    encode = embedder.encode
    seconds_in_encode = [0.0]

    def timed_encode(items, *more, **kwargs):
        start = time.perf_counter()
        try:
            return encode(items, *more, **kwargs)
        finally:
            seconds_in_encode[0] += time.perf_counter() - start

    embedder.encode = timed_encode
    runs = itertools.count()

    def pipeline() -> float:
        """Seconds of the pipeline spent inside Embedder.encode."""
        seconds_in_encode[0] = 0.0
        out = tmp / f"run-{next(runs)}"
        encode_config = EncodeConfig(cache_dir=str(out / "embeddings"), batch_size=args.batch_size)
        MBEIREvaluator(embedder, root, encode_config, MBEIREvalConfig(), progress=False).evaluate(
            list(EVAL_ROWS), pools, out / "results")
        return seconds_in_encode[0]

    def bare() -> None:
        for items in item_sets:
            encode(items, batch_size=args.batch_size)

    pipeline()  # warm: parsed tables, faiss, matplotlib
    bare()
    best_bare, best_pipeline, encode_share = float("inf"), float("inf"), 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        bare()
        best_bare = min(best_bare, time.perf_counter() - start)
        start = time.perf_counter()
        inside = pipeline()
        elapsed = time.perf_counter() - start
        if elapsed < best_pipeline:
            best_pipeline, encode_share = elapsed, inside

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"synthetic {args.size}: {count} items (16 query sets + 16 local pools), "
          f"pool={args.pool}, batch_size={args.batch_size}, threads={torch.get_num_threads()}, "
          f"best of {args.repeats}, load average {load}")
    print(f"bare Embedder.encode:       {count / best_bare:8.1f} items/s  ({best_bare:.2f} s)")
    print(f"whole evaluation pipeline:  {count / best_pipeline:8.1f} items/s  ({best_pipeline:.2f} s: "
          f"{encode_share:.2f} s encoding, {best_pipeline - encode_share:.2f} s cache, search, scoring, reports)")
    print(f"pipeline / bare throughput ratio: {best_bare / best_pipeline:.3f}")


if __name__ == "__main__":
    main()
