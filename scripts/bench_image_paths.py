"""What the image checks of issue 13 cost, side by side in one run.

1. `resolve_under` per image path, lexical only (data.allow_symlinks_outside_root=true) vs with
   symlinks resolved (the default), on N files in one directory as mbeir_images/ lays them out:
   the per-item price every encoder and training sample now pays.
2. validate's image check, `Image.verify` (reads headers, passes a truncated JPEG) vs
   `Image.load` (decodes fully, which `umarvel data validate --images open` now does).

    python scripts/bench_image_paths.py --paths 5000 --images 200
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import timeit

from PIL import Image

from umarvel.data.mbeir import resolve_under


def bench_paths(root: str, count: int, repeats: int) -> tuple[float, float]:
    folder = os.path.join(root, "mbeir_images", "mscoco_images")
    os.makedirs(folder)
    paths = []
    for i in range(count):
        open(os.path.join(folder, f"{i}.jpg"), "wb").close()
        paths.append(f"mbeir_images/mscoco_images/{i}.jpg")
    timings = {}
    for outside in (True, False, True, False):  # interleaved, best of each
        run = lambda: [resolve_under(root, p, symlinks_outside_root=outside) for p in paths]  # noqa: E731
        best = min(timeit.repeat(run, number=1, repeat=repeats)) / count
        timings[outside] = min(best, timings.get(outside, best))
    return timings[True], timings[False]


def bench_decode(root: str, count: int, repeats: int, size: int = 384) -> tuple[float, float]:
    rng = random.Random(0)
    files = []
    for i in range(count):
        path = os.path.join(root, f"img{i}.jpg")
        Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(path, quality=90)
        files.append(path)

    def verify():
        for path in files:
            with Image.open(path) as image:
                image.verify()

    def load():
        for path in files:
            with Image.open(path) as image:
                image.load()

    return (min(timeit.repeat(verify, number=1, repeat=repeats)) / count,
            min(timeit.repeat(load, number=1, repeat=repeats)) / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=5000, help="image paths resolved per round")
    parser.add_argument("--images", type=int, default=200, help="384x384 JPEGs checked per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best counts")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as root:
        lexical, resolved = bench_paths(os.path.join(root, "M-BEIR"), args.paths, args.repeats)
        print(f"resolve_under, lexical only     {lexical * 1e6:8.1f} us/path")
        print(f"resolve_under, symlinks resolved {resolved * 1e6:7.1f} us/path   ratio {resolved / lexical:.2f}")
        verify, load = bench_decode(root, args.images, args.repeats)
        print(f"Image.verify                     {verify * 1e3:7.2f} ms/image")
        print(f"Image.load (full decode)         {load * 1e3:7.2f} ms/image   ratio {load / verify:.1f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
