"""Why the demo slowed down far more than the load explains, and what the intra-op thread count
does about it: one tiny-model training step (forward + backward, as bench_train.py) timed with
torch's intra-op threads at every core and at 1, with OpenMP's default (spinning) wait policy
and with OMP_WAIT_POLICY=PASSIVE, on idle cores and next to --busy busy-looping processes,
side by side in one run:

    python scripts/bench_threads.py [--busy 4] [--steps 6] [--batch 16]

Each figure comes from a fresh process (the wait policy is read when OpenMP starts); the busy
processes are this script's own children and are ended before it exits. The slowdown column
is each setting's time under load over its time idle; with B busy processes on C cores a fair
share predicts about (B + threads) / C for threads <= C.
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

SETTINGS = [  # (label, intra-op threads (0: every core), OMP_WAIT_POLICY or None)
    ("all cores, spin", 0, None),
    ("all cores, passive", 0, "PASSIVE"),
    ("1 thread", 1, None),
]


def _spin() -> None:
    while True:
        pass


def run_one(model_dir: str, threads: int, batch_size: int, steps: int) -> None:
    """Time `steps` training steps in this process; print the median seconds per step."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import examples, step

    from umarvel import Embedder
    from umarvel.data.collator import PairCollator

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    embedder = Embedder.from_pretrained(model_dir, trainable=True, prompt={"max_pixels": 112 * 112})
    embedder.train()
    image_start = embedder.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    batch = PairCollator(embedder.collator)(examples(batch_size))
    step(embedder, batch, 0, image_start)  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step(embedder, batch, 0, image_start)
        times.append(time.perf_counter() - started)
    print(sorted(times)[len(times) // 2])


def measure(model_dir: str, threads: int, policy: str | None, batch_size: int, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, __file__, "--one", model_dir, str(threads), "--batch", str(batch_size),
                           "--steps", str(steps)], capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=4, help="busy-looping processes for the loaded runs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.batch, args.steps)
        return
    from umarvel.tiny import build_tiny_model

    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average at start {os.getloadavg()[0]:.2f}; tiny qwen2-vl, batch {args.batch}, "
          f"median of {args.steps} steps; loaded = next to {args.busy} busy processes")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "tiny"))
        idle = {label: measure(model_dir, threads, policy, args.batch, args.steps)
                for label, threads, policy in SETTINGS}
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
        for spinner in spinners:
            spinner.start()
        try:
            loaded = {label: measure(model_dir, threads, policy, args.batch, args.steps)
                      for label, threads, policy in SETTINGS}
        finally:
            for spinner in spinners:
                spinner.terminate()
                spinner.join()
    baseline = idle[SETTINGS[0][0]]
    print(f"{'setting':20s} {'idle s':>8s} {'loaded s':>9s} {'slowdown':>9s} {'idle vs spin':>13s} {'loaded vs spin':>15s}")
    for label, _, _ in SETTINGS:
        print(f"{label:20s} {idle[label]:8.3f} {loaded[label]:9.3f} {loaded[label] / idle[label]:9.2f} "
              f"{idle[label] / baseline:13.2f} {loaded[label] / loaded[SETTINGS[0][0]]:15.2f}")


if __name__ == "__main__":
    main()
