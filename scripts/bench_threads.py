"""Why the demo slowed down far more than the load explains, and what the wait policy and the
intra-op thread count do about it: a tiny-model training step (forward + backward of 16 caption ->
image pairs, InfoNCE) and an encode of 32 items, timed with torch's intra-op threads at every core
with OpenMP's default (spinning) wait policy, with OMP_WAIT_POLICY=PASSIVE, and at 1 thread, first
without and then next to --busy busy-looping processes, side by side in one run:

    python scripts/bench_threads.py [--busy 4] [--steps 6] [--batch 16]

Each figure comes from a fresh process that imports torch before umarvel (so umarvel's own
PASSIVE default does not apply; the wait policy is read when OpenMP starts) and is printed as it
comes. The busy processes are this script's own children and are ended before it exits. The
slowdown column is each setting's time loaded over its time without the busy processes.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [  # (label, intra-op threads (0: torch's default, every core), OMP_WAIT_POLICY or None)
    ("all cores, spin", 0, None),
    ("all cores, passive", 0, "PASSIVE"),
    ("1 thread", 1, None),
]
WORKLOADS = ("train step", "encode")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def _spin() -> None:
    while True:
        pass


def _examples(n: int) -> list[dict]:
    """Caption -> image pairs of the size the demo trains on (112 x 112)."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        image = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(image).ellipse((10 + i % 30, 10, 60 + i % 30, 60), fill=colour)
        out.append({"query": {"qid": f"9:{i}", "text": f"a {colour} circle number {i}",
                              "instruction": "Retrieve the image that matches the caption."},
                    "positive": {"did": f"9:{i}", "image": image}, "negatives": []})
    return out


def run_one(model_dir: str, threads: int, workload: str, batch_size: int, steps: int) -> None:
    """Time `steps` repeats of `workload` in this process; print the median seconds."""
    import torch

    from umarvel import Embedder
    from umarvel.data.collator import PairCollator
    from umarvel.training.losses import CandidateIds, info_nce

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    embedder = Embedder.from_pretrained(model_dir, trainable=True, prompt={"max_pixels": 112 * 112})
    examples = _examples(batch_size)
    if workload == "encode":
        embedder.eval()
        items = [e["positive"] for e in examples] + [e["query"] for e in examples]

        def once() -> None:
            embedder.encode(items, batch_size=batch_size)
    else:
        embedder.train()
        batch = PairCollator(embedder.collator)(examples)
        ids = CandidateIds(**batch["ids"])

        def once() -> None:
            embedder.zero_grad(set_to_none=True)
            loss = info_nce(embedder.embed_batch(batch["query"]), embedder.embed_batch(batch["positive"]),
                            embedder.temperature(), ids=ids).loss
            loss.backward()
    once()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    print(sorted(times)[len(times) // 2])


def measure(model_dir: str, threads: int, policy: str | None, workload: str, batch_size: int, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, __file__, "--one", model_dir, str(threads), workload, "--batch",
                           str(batch_size), "--steps", str(steps)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the measuring process failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure_all(model_dir: str, batch_size: int, steps: int, phase: str) -> dict[tuple[str, str], float]:
    """Every workload under every setting; each figure is printed as it comes (a slow loaded run
    that is cut short keeps what it measured)."""
    figures = {}
    for workload in WORKLOADS:
        for label, threads, policy in SETTINGS:
            figures[workload, label] = measure(model_dir, threads, policy, workload, batch_size, steps)
            print(f"  {phase}: {workload}, {label}: {figures[workload, label]:.3f} s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=4, help="busy-looping processes for the loaded runs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "THREADS", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.one[2], args.batch, args.steps)
        return
    from umarvel.tiny import build_tiny_model

    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average at start {os.getloadavg()[0]:.2f}; tiny qwen2-vl, batch {args.batch}, "
          f"median of {args.steps} repeats; loaded = next to {args.busy} more busy processes", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "tiny"))
        idle = measure_all(model_dir, args.batch, args.steps, "idle")
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
        for spinner in spinners:
            spinner.start()
        try:
            loaded = measure_all(model_dir, args.batch, args.steps, "loaded")
            load_loaded = os.getloadavg()[0]
        finally:
            for spinner in spinners:
                spinner.terminate()
                spinner.join()
    print(f"load average at the end of the loaded runs {load_loaded:.2f}")
    print(f"{'workload':11s} {'setting':20s} {'idle s':>8s} {'loaded s':>9s} {'slowdown':>9s} "
          f"{'idle vs default':>16s} {'loaded vs default':>18s}")
    for workload in WORKLOADS:
        default = (workload, SETTINGS[0][0])
        for label, _, _ in SETTINGS:
            key = (workload, label)
            print(f"{workload:11s} {label:20s} {idle[key]:8.3f} {loaded[key]:9.3f} {loaded[key] / idle[key]:9.2f} "
                  f"{idle[default] / idle[key]:15.2f}x {loaded[default] / loaded[key]:17.2f}x")


if __name__ == "__main__":
    main()
