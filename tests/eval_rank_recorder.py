"""torchrun worker: the `umarvel` command exactly as `python -m umarvel` runs it, recording the
ids of every Embedder.encode call (one line per call) in RECORD_DIR/rank-<RANK>.txt, so a test
can tell which rank encoded which shard.

Usage: torchrun --nproc_per_node 2 tests/eval_rank_recorder.py RECORD_DIR eval mbeir ...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from umarvel import Embedder
from umarvel.cli import main


def recording(encode, record: Path):
    def encode_and_record(self, items, *args, **kwargs):
        with open(record, "a") as out:
            out.write(" ".join(item.get("qid") or item.get("did") or item["id"] for item in items) + "\n")
        return encode(self, items, *args, **kwargs)

    return encode_and_record


if __name__ == "__main__":
    Embedder.encode = recording(Embedder.encode, Path(sys.argv[1]) / f"rank-{os.environ['RANK']}.txt")
    sys.exit(main(sys.argv[2:]))
