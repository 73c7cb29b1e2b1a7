"""Exact search benchmark: umarvel's chunked FAISS search against a plain matmul + top-k bound.

One random fp16 pool (default 1M x 256, L2-normalised), the same queries for every method.
Each method runs in its own subprocess so its peak memory is its own: the peak-RSS mark is reset
just before the search (Linux /proc/self/clear_refs) and read right after. Reported side by side:
search time, throughput, time and peak memory relative to FAISS, and peak RSS over the raw
embedding bytes (pool + queries), which is the number the 40 GB global pool cares about.
Methods run interleaved for --rounds rounds and each one's fastest round counts: on a shared
machine the load changes within a run.

    python scripts/bench_search.py --candidates 1000000 --dim 256 --queries 512 --k 10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = {
    "faiss": "umarvel.retrieval.index.search (chunked faiss.knn, deterministic ties)",
    "faiss-memmap": "the same, pool read from a memory-mapped .npy",
    "torch-topk": "bound: torch fp32 matmul per chunk + torch.topk, running merge",
    "numpy-argpartition": "bound: numpy fp32 matmul per chunk + argpartition, running merge",
    "torch-matmul-only": "floor: the chunked fp32 matmuls alone, no selection",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="candidate rows per fp32 chunk for faiss (default: index.CHUNK_BYTES worth)")
    parser.add_argument("--bound-chunk", type=int, default=16384, help="candidate rows per matmul in the bounds")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over all methods, interleaved; each method's fastest round counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}")
    with tempfile.TemporaryDirectory(prefix="bench_search.") as tmp:
        data = Path(tmp)
        _write_data(data, args)
        print(f"pool {args.candidates} x {args.dim} fp16 ({_mib(args.candidates * args.dim * 2)}), "
              f"{args.queries} queries, k={args.k}")
        rounds = [{method: _run_worker(method, data, args) for method in methods} for _ in range(args.rounds)]
        runs = {method: min((r[method] for r in rounds), key=lambda run: run["seconds"]) for method in methods}
        _print_table(runs, data, args)
    return 0


def _write_data(data: Path, args) -> None:
    rng = np.random.default_rng(args.seed)
    pool = np.empty((args.candidates, args.dim), np.float16)
    for start in range(0, args.candidates, 65536):
        block = rng.standard_normal((min(65536, args.candidates - start), args.dim), dtype=np.float32)
        pool[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    np.save(data / "pool.npy", pool)
    # Queries near pool items, so top-k holds real neighbours rather than noise.
    picks = rng.choice(args.candidates, args.queries, replace=False)
    queries = pool[picks].astype(np.float32) + 0.05 * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    np.save(data / "queries.npy", (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float16))


def _run_worker(method: str, data: Path, args) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--data", str(data), "--k", str(args.k),
               "--bound-chunk", str(args.bound_chunk)]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(args) -> int:
    data = Path(args.data)
    pool = np.load(data / "pool.npy", mmap_mode="r" if args.worker == "faiss-memmap" else None)
    queries = np.load(data / "queries.npy")
    search = _search_function(args.worker)  # imports happen here, before the memory mark
    before = _reset_peak_rss()
    start = time.perf_counter()
    ids = search(queries, pool, args.k, args)
    seconds = time.perf_counter() - start
    np.save(data / f"ids.{args.worker}.npy", ids)
    print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": _peak_rss()}))
    return 0


def _search_function(method: str):
    if method in ("faiss", "faiss-memmap"):
        from umarvel.retrieval.index import search

        return lambda q, pool, k, args: search(q, pool, k, chunk_size=args.chunk_size, use_gpu=False)[1]
    if method == "numpy-argpartition":
        return _numpy_argpartition
    import torch

    if method == "torch-topk":
        return lambda q, pool, k, args: _torch_topk(torch, q, pool, k, args.bound_chunk)
    return lambda q, pool, k, args: _torch_matmul_only(torch, q, pool, args.bound_chunk)


def _torch_topk(torch, queries, pool, k, chunk):
    q = torch.from_numpy(queries.astype(np.float32))
    best_scores = torch.empty((len(q), 0))
    best_ids = torch.empty((len(q), 0), dtype=torch.int64)
    for start in range(0, len(pool), chunk):
        block = torch.from_numpy(np.ascontiguousarray(pool[start : start + chunk], dtype=np.float32))
        scores, ids = torch.topk(q @ block.T, min(k, len(block)), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_ids = torch.cat([best_ids, ids + start], dim=1)
        best_scores, order = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_ids = torch.gather(merged_ids, 1, order)
    return best_ids.numpy()


def _torch_matmul_only(torch, queries, pool, chunk):
    q = torch.from_numpy(queries.astype(np.float32))
    for start in range(0, len(pool), chunk):
        block = torch.from_numpy(np.ascontiguousarray(pool[start : start + chunk], dtype=np.float32))
        q @ block.T
    return np.empty((len(q), 0), np.int64)


def _numpy_argpartition(queries, pool, k, args):
    q = queries.astype(np.float32)
    best_scores = np.empty((len(q), 0), np.float32)
    best_ids = np.empty((len(q), 0), np.int64)
    for start in range(0, len(pool), args.bound_chunk):
        scores = q @ np.ascontiguousarray(pool[start : start + args.bound_chunk], dtype=np.float32).T
        width = min(k, scores.shape[1])
        ids = np.argpartition(-scores, width - 1, axis=1)[:, :width]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, ids, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_ids = np.take_along_axis(merged_ids, order, 1)
    return best_ids


def _reset_peak_rss() -> int:
    """Current RSS in bytes, after resetting the kernel's peak-RSS mark to it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _print_table(runs: dict, data: Path, args) -> None:
    raw = (args.candidates + args.queries) * args.dim * 2
    pairs = args.candidates * args.queries
    base = runs.get("faiss")
    reference_ids = np.load(data / "ids.faiss.npy") if base else None
    print(f"raw embedding bytes (pool + queries, fp16): {_mib(raw)}\n")
    header = f"{'method':20s} {'search s':>9s} {'Mpairs/s':>9s} {'time/faiss':>10s} {'peak RSS':>10s} " \
             f"{'peak/raw':>8s} {'extra':>9s} {'extra/raw':>9s} {'peak/faiss':>10s} {'top-k = faiss':>13s}"
    print(header)
    print("-" * len(header))
    for method, run in runs.items():
        extra = max(0, run["peak_rss"] - run["rss_before"])
        ids = np.load(data / f"ids.{method}.npy")
        same = f"{np.mean(np.sort(ids, 1) == np.sort(reference_ids, 1)):.4f}" if base and ids.size else "-"
        print(
            f"{method:20s} {run['seconds']:9.2f} {pairs / run['seconds'] / 1e6:9.0f} "
            f"{run['seconds'] / base['seconds'] if base else float('nan'):10.2f} {_mib(run['peak_rss']):>10s} "
            f"{run['peak_rss'] / raw:8.2f} {_mib(extra):>9s} {extra / raw:9.2f} "
            f"{run['peak_rss'] / base['peak_rss'] if base else float('nan'):10.2f} {same:>13s}"
        )
    print()
    for method in runs:
        print(f"  {method:20s} {METHODS[method]}")
    print("  extra = peak RSS during the search minus RSS just before it (pool and queries already loaded;"
          " for memmap the pool pages are read during the search, so they count as extra)")


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


if __name__ == "__main__":
    sys.exit(main())
