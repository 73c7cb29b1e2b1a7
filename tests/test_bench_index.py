"""scripts/bench_index.py measures recall right: ties with the exact k-th score count, missing results
do not, and found ids are scored against the right rows of a sharded pool (the benchmark itself is
not run here)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_index.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_index", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_counts_overlap_and_ties_not_missing_results(bench):
    exact = np.array([[0.9, 0.8, 0.5], [0.7, 0.6, 0.6]], np.float32)
    found = np.array([
        [0.9, 0.5, 0.4],       # two of the exact top 3, one below it
        [0.6, -np.inf, 0.7],   # a tie with the exact 3rd score counts; a missing result (-1) does not
    ], np.float32)
    assert bench.recall_at_k(exact, found, 3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert bench.recall_at_k(exact, found, 1) == pytest.approx(0.5)


def test_true_scores_read_rows_across_shards(bench):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((7, 4)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    shards = [pool[:3].astype(np.float16), pool[3:5].astype(np.float16), pool[5:].astype(np.float16)]
    queries = pool[[6, 0]]
    ids = np.array([[6, 4, -1], [0, 3, 2]])
    scores = bench._true_scores(shards, queries, ids)
    want = np.einsum("qkd,qd->qk", pool[np.maximum(ids, 0)], queries)
    np.testing.assert_allclose(scores[ids >= 0], want[ids >= 0], atol=2e-3)  # fp16 shards, re-normalised
    assert scores[0, 2] == -np.inf
