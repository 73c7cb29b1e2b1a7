"""The evaluator-protocol refactor changed no M-BEIR number: `umarvel eval mbeir --pool both`
on the synthetic benchmark writes the same results.json and byte-identical run files as the
code before it (tests/data/mbeir_before.json, written by that code with `python
tests/test_mbeir_unchanged.py`). It was re-written once, by the pre-refactor evaluator with the
fp32 re-normalising search of the release-profile work (scores in the run files moved in their
last digits; every result and ranking stayed the same).

The embedder is a deterministic bag of words + image colour, so the stored outputs do not hang
on float rounding of a neural model, and its many equal scores exercise the tie order.

Run files are compared as rankings up to the order inside a group of equal scores (scores one
written digit apart count as equal), and without each query's last group (the cut at k may take any of its members): candidates whose scores are
mathematically equal can differ in their last fp32 bit from one CPU's BLAS kernels to another's,
which decides their order, and how a score rounds to 6 decimals. The stored form was re-written
twice by the code before the wave-3 changes (e4192bd), on AMD EPYC machines: for the tie groups
(its results.json identical to the stored one, 2 of 32 raw run files hashed differently), then for
the one-step tolerance (results.json again identical; one global run file had split a tie group).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from umarvel import profiles
from umarvel.config import ModelConfig

BEFORE = Path(__file__).parent / "data" / "mbeir_before.json"
WORD_AXES = 48


class WordColourEmbedder:
    """Hashed word counts beside the image's mean colour, quantised to eighths."""

    dtype = torch.float32

    def __init__(self, weights_dir: Path):
        self.settings = ModelConfig(backbone=str(weights_dir))
        self.rules = profiles.resolve(self.settings)
        self.has_adapter = False

    def encode(self, items: list[dict], batch_size: int = 16, **_) -> np.ndarray:
        vectors = torch.zeros(len(items), WORD_AXES + 3)
        for row, item in enumerate(items):
            for word in re.findall(r"[a-z]+", " ".join(filter(None, [item.get("text"), item.get("instruction")])).lower()):
                vectors[row, zlib.crc32(word.encode()) % WORD_AXES] += 1
            if item.get("image") is not None:
                image = item["image"] if isinstance(item["image"], Image.Image) else Image.open(item["image"])
                mean = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255
                vectors[row, WORD_AXES:] = torch.tensor(np.round(mean * 8) / 8 * 4)
        return F.normalize(vectors, dim=-1).numpy()


def mbeir_outputs(work: Path, monkeypatch=None) -> dict:
    """{pool: {"results": results.json, "runs": {run file: sha256}}} of the CLI's evaluation."""
    from umarvel.cli import main
    from umarvel.data.synthetic import write_synthetic
    from umarvel.modeling import embedder as embedder_module

    data = write_synthetic(work / "synthetic", seed=0, size="tiny")
    weights = work / "weights"
    weights.mkdir(exist_ok=True)
    fake = lambda *args, **kwargs: WordColourEmbedder(weights)  # noqa: E731
    if monkeypatch is not None:
        monkeypatch.setattr(embedder_module, "load_for_inference", fake)
    else:
        embedder_module.load_for_inference = fake
    out = work / "eval"
    code = main(["eval", "mbeir", "--pool", "both", "--model", str(weights), "--data", str(data),
                 "--output-dir", str(out), "--cache-dir", str(work / "cache")])
    assert code == 0
    return {
        pool: {
            "results": json.loads((out / pool / "results.json").read_text()),
            "runs": {path.name: hashlib.sha256(tie_free(path.read_text()).encode()).hexdigest()
                     for path in sorted((out / pool).glob("*_run.txt"))},
        }
        for pool in ("local", "global")
    }


WRITTEN_STEP = 1e-6  # run files write scores to 6 decimals


def tie_free(run: str) -> str:
    """A TREC run file as `qid did,did,...` lines, one per group of equal scores in rank order,
    each group's dids sorted, each query's last group left out. Scores one written step apart
    count as equal: a mathematically equal pair can round to neighbouring 6-decimal strings when
    their fp32 values differ in the last bit."""
    groups: dict[str, list[tuple[float, list[str]]]] = {}
    for line in run.splitlines():
        qid, _, did, _, score, *_ = line.split()
        ranked = groups.setdefault(qid, [])
        if ranked and ranked[-1][0] - float(score) <= WRITTEN_STEP * 1.5:
            ranked[-1] = (float(score), ranked[-1][1] + [did])
        else:
            ranked.append((float(score), [did]))
    return "".join(f"{qid} {','.join(sorted(dids))}\n"
                   for qid, ranked in groups.items() for _, dids in ranked[:-1])


def test_tie_free_form_keeps_the_ranking_and_forgets_the_order_of_equal_scores():
    run = "q Q0 a 1 0.9 t 0\nq Q0 c 2 0.5 t 0\nq Q0 b 3 0.5 t 0\nq Q0 d 4 0.1 t 0\n"
    swapped = run.replace("c 2", "B 2").replace("b 3", "c 3").replace("B 2", "b 2")
    rounded_apart = run.replace("b 3 0.5", "b 3 0.499999")
    reranked = run.replace("a 1 0.9", "x 1 0.9")
    assert tie_free(run) == tie_free(swapped) == tie_free(rounded_apart) == "q a\nq b,c\n"
    assert tie_free(run) != tie_free(reranked)
    assert tie_free(run.replace("b 3 0.5", "b 3 0.4999")) == "q a\nq c\nq b\n"


def test_mbeir_results_and_run_files_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))
    before = json.loads(BEFORE.read_text())
    after = mbeir_outputs(tmp_path, monkeypatch)
    assert len(after["local"]["runs"]) == len(after["global"]["runs"]) == 16
    assert after == before


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        import os

        os.environ["UMARVEL_CACHE"] = str(Path(scratch) / "umarvel-cache")
        outputs = mbeir_outputs(Path(scratch))
    BEFORE.parent.mkdir(exist_ok=True)
    BEFORE.write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
    print(f"wrote {BEFORE}", file=sys.stderr)
