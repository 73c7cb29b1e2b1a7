"""Peak memory of loading a large candidate pool: umarvel's Arrow reader vs. a list of dicts.

    python scripts/bench_pool_memory.py [--rows 1000000] [--workdir DIR]

Writes an M-BEIR-format text candidate pool of --rows rows, then measures each way of loading it
in a fresh subprocess, which prints its own peak RSS (ru_maxrss): importing the reader only; the
first load (streaming parse into the Arrow cache); a later load (memory-mapped cache); and the
naive `[json.loads(line) for line in file]` plus a did -> record dict. Every load then looks up
10,000 random dids and walks all dids once, as an encoder or a trainer would. Peak RSS counts
the mapped cache pages a process touched (shared between ranks, reclaimable by the OS);
"private at end" (RssAnon) is the memory each process really holds on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "red green blue small large circle square triangle star left right top bottom two three one with and".split()

MEASURE = r"""
import json, random, resource, sys
mode, pool_path, cache_dir, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from umarvel.data.mbeir import open_pool
dids = [f"1:{i}" for i in random.Random(0).sample(range(rows), 10_000)]
if mode in ("arrow-first", "arrow-cached"):
    pool = open_pool(pool_path, "/", cache_dir=cache_dir, progress=False)
    found = sum(pool.get(did)["did"] == did for did in dids)
    walked = sum(1 for _ in pool.dids())
elif mode == "naive":
    records = [json.loads(line) for line in open(pool_path)]
    by_did = {record["did"]: record for record in records}
    found = sum(by_did[did]["did"] == did for did in dids)
    walked = sum(1 for _ in records)
else:
    found = walked = 0
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "private_mb": int(status["RssAnon"].split()[0]) / 1024, "found": found, "walked": walked}))
"""


def write_pool(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as out:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            out.write(json.dumps({"txt": text, "img_path": None, "modality": "text", "did": f"1:{i}",
                                  "src_content": None}) + "\n")


def measure(mode: str, pool: Path, cache: Path, rows: int) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, mode, str(pool), str(cache), str(rows)],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", help="where to write the pool and the cache (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        pool, cache = Path(work) / "mbeir_bench_cand_pool.jsonl", Path(work) / "cache"
        write_pool(pool, args.rows)
        size_mb = os.path.getsize(pool) / 2**20
        print(f"pool: {args.rows:,} text candidates, {size_mb:,.0f} MB of JSON lines")
        imports = measure("imports", pool, cache, args.rows)
        baseline = imports["peak_rss_mb"]
        print(f"{'load':36s} {'peak RSS':>9s} {'over imports':>13s} {'x file size':>12s} {'private at end':>15s}")
        print(f"{'python + reader imports':36s} {baseline:>7,.0f}MB {'':>13s} {'':>12s} {imports['private_mb']:>13,.0f}MB")
        for mode, label in (("arrow-first", "umarvel, first load (builds cache)"),
                            ("arrow-cached", "umarvel, later load (memory-mapped)"),
                            ("naive", "json.loads list of dicts + dict")):
            result = measure(mode, pool, cache, args.rows)
            assert result["found"] == 10_000 and result["walked"] == args.rows, result
            peak = result["peak_rss_mb"]
            print(f"{label:36s} {peak:>7,.0f}MB {peak - baseline:>11,.0f}MB {(peak - baseline) / size_mb:>11.2f}x "
                  f"{result['private_mb']:>13,.0f}MB")


if __name__ == "__main__":
    main()
