"""What the embedding cache's checks cost: a verified load (manifest schema, shard rows and dim,
ids, finite unit norms, checksum; norms and checksum once per version of a shard's files)
against a bare memory-mapped load and against one search over the same pool; and the set
fingerprint's per-image stat against the per-item encoding it guards.

One random fp16 pool of unit vectors in shards (default 400k x 1024, 50k per shard, in a
temporary directory), loaded from a warm page cache, each way best of --repeats rounds:

    python scripts/bench_cache.py --candidates 400000 --dim 1024 --queries 256 --images 20000
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from umarvel.io import atomic_write_json
from umarvel.retrieval import encode
from umarvel.retrieval.index import search


def write_pool(directory: Path, count: int, dim: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    shards = []
    for index, start in enumerate(range(0, count, shard_size)):
        rows = min(shard_size, count - start)
        vectors = rng.standard_normal((rows, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors.astype(np.float16)
        ids_text = "".join(f"0:{start + i}\n" for i in range(rows)).encode()
        np.save(directory / f"shard-{index:05d}.npy", vectors)
        (directory / f"shard-{index:05d}.ids.txt").write_bytes(ids_text)
        shards.append({"file": f"shard-{index:05d}.npy", "ids": f"shard-{index:05d}.ids.txt", "rows": rows,
                       "checksum": encode.shard_checksum(ids_text, vectors)})
    atomic_write_json(directory / encode.MANIFEST, {"format": encode.CACHE_FORMAT, "fingerprint": "f",
                                                    "rows": count, "dim": dim, "shards": shards})


def bare_load(directory: Path) -> list[np.ndarray]:
    """What loading cost before the checks: open each shard memory-mapped, read its ids."""
    shards = []
    for path in sorted(directory.glob("shard-*.npy")):
        shards.append(np.load(path, mmap_mode="r"))
        path.with_suffix(".ids.txt").read_text().splitlines()
    return shards


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "set"
        directory.mkdir()
        write_pool(directory, args.candidates, args.dim, args.shard_size)
        queries = np.asarray(bare_load(directory)[0][: args.queries], dtype=np.float32)
        os.environ["UMARVEL_CACHE"] = str(Path(tmp) / "cache")
        bare = best(lambda: bare_load(directory), args.repeats)
        verified = best(lambda: (shutil.rmtree(Path(tmp) / "cache", ignore_errors=True),
                                 encode.load_encoded(directory, "f")), args.repeats)
        noted = best(lambda: encode.load_encoded(directory, "f"), args.repeats)
        shards = encode.load_encoded(directory).shards
        searched = best(lambda: search(queries, shards, 10, use_gpu=False), args.repeats)

        images = Path(tmp) / "images"
        images.mkdir()
        names = [f"{i:07d}.jpg" for i in range(args.images)]
        for name in names:
            (images / name).write_bytes(os.urandom(2048))
        stat_all = best(lambda: encode.images_fingerprint(images, names), args.repeats)

    gb = args.candidates * args.dim * 2 / 1e9
    print(f"pool {args.candidates} x {args.dim} fp16 ({gb:.2f} GB) in shards of {args.shard_size}; "
          f"{args.queries} queries, top 10\n")
    print("| step | seconds | / bare load | / one search |")
    print("|---|---|---|---|")
    for name, seconds in (("bare load (mmap + ids)", bare),
                          ("first load of shard files not noted as checked (schema, ids, norms, checksum)", verified),
                          ("later loads (schema, ids; norms and checksum noted as checked)", noted),
                          (f"search of {args.queries} queries", searched)):
        print(f"| {name} | {seconds:.3f} | {seconds / bare:.1f} | {seconds / searched:.2f} |")
    print(f"\nverification reads {gb / max(verified - bare, 1e-9):.2f} GB/s "
          f"(5.6M x 3584 global pool, 40 GB: ~{40 / (gb / max(verified - bare, 1e-9)):.0f} s)")
    per_image = stat_all / args.images * 1e6
    print(f"image fingerprint: {per_image:.1f} us per image (warm page cache); "
          f"{args.images} images {stat_all:.3f} s; 5.6M images ~{per_image * 5.6:.0f} s")


if __name__ == "__main__":
    main()
