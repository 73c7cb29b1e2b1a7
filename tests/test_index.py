"""Chunked FAISS search equals a brute-force ranking, including how ties are broken."""
import numpy as np
import pytest

from umarvel.errors import UmarvelError
from umarvel.retrieval.index import search


def grid_vectors(rng, n, dim=8):
    """fp16 vectors on a coarse grid: exact dot products in any summation order, many ties."""
    return (rng.integers(-2, 3, size=(n, dim)) * 0.25).astype(np.float16)


def brute_force(queries, candidates, k):
    """Every score, sorted by descending score then ascending candidate index."""
    scores = queries.astype(np.float32) @ candidates.astype(np.float32).T
    ids = np.broadcast_to(np.arange(len(candidates)), scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), order


@pytest.fixture(scope="module")
def tied_pool():
    rng = np.random.default_rng(0)
    return grid_vectors(rng, 40), grid_vectors(rng, 1000)


@pytest.mark.parametrize("chunk_size", [2, 7, 64, 333, 999, 1000, 5000])
@pytest.mark.parametrize("query_chunk_size", [16, 4096])  # below and above faiss's BLAS threshold
def test_chunked_search_equals_brute_force_with_ties(tied_pool, chunk_size, query_chunk_size):
    queries, candidates = tied_pool
    want_scores, want_ids = brute_force(queries, candidates, 10)
    scores, ids = search(
        queries, candidates, 10, chunk_size=chunk_size, query_chunk_size=query_chunk_size, use_gpu=False
    )
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


def test_tie_groups_split_across_chunks_rank_lower_index_first():
    # Ten identical candidates around a chunk boundary, k cutting through the group.
    candidates = np.zeros((30, 4), dtype=np.float16)
    candidates[:, 0] = 0.5
    candidates[10:20, 0] = 1.0
    query = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float16)
    for chunk_size in (3, 5, 15, 16, 30):
        scores, ids = search(query, candidates, 4, chunk_size=chunk_size, use_gpu=False)
        assert ids.tolist() == [[10, 11, 12, 13]], chunk_size
        assert scores.tolist() == [[1.0] * 4]
        _, ids = search(query, candidates, 12, chunk_size=chunk_size, use_gpu=False)
        assert ids.tolist() == [list(range(10, 20)) + [0, 1]], chunk_size


def test_random_fp32_queries_against_fp16_pool():
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((25, 32)).astype(np.float32)
    candidates = rng.standard_normal((500, 32)).astype(np.float16)
    want_scores, want_ids = brute_force(queries, candidates, 20)
    scores, ids = search(queries, candidates, 20, chunk_size=37, use_gpu=False)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_memmap_shards_are_numbered_consecutively(tmp_path, tied_pool):
    queries, candidates = tied_pool
    shards = []
    for number, (start, stop) in enumerate([(0, 300), (300, 301), (301, 1000)]):
        path = tmp_path / f"shard{number}.npy"
        np.save(path, candidates[start:stop])
        shards.append(np.load(path, mmap_mode="r"))
    assert isinstance(shards[0], np.memmap)
    want_scores, want_ids = brute_force(queries, candidates, 15)
    for chunk_size in (50, None):
        scores, ids = search(queries, shards, 15, chunk_size=chunk_size, use_gpu=False)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)
    scores, ids = search(queries, shards[0], 5, use_gpu=False)
    np.testing.assert_array_equal(ids, brute_force(queries, candidates[:300], 5)[1])


def test_k_larger_than_the_pool_returns_the_whole_pool_ranked():
    rng = np.random.default_rng(2)
    queries, candidates = grid_vectors(rng, 3), grid_vectors(rng, 6)
    scores, ids = search(queries, [candidates[:2], candidates[2:]], 50, chunk_size=4, use_gpu=False)
    assert ids.shape == scores.shape == (3, 6)
    np.testing.assert_array_equal(ids, brute_force(queries, candidates, 6)[1])


def test_bad_shapes_are_clear_errors():
    queries = np.zeros((2, 8), np.float16)
    with pytest.raises(UmarvelError, match="same model"):
        search(queries, np.zeros((5, 4), np.float16), 1, use_gpu=False)
    with pytest.raises(UmarvelError, match="empty"):
        search(queries, np.zeros((0, 8), np.float16), 1, use_gpu=False)
    with pytest.raises(ValueError, match="k must be"):
        search(queries, np.zeros((5, 8), np.float16), 0, use_gpu=False)


def test_use_gpu_true_without_a_gpu_says_so():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(UmarvelError, match="no GPU"):
        search(np.zeros((1, 4), np.float32), np.zeros((3, 4), np.float16), 1, use_gpu=True)


def test_gpu_slicing_with_faiss_gpu_classes_stood_in_by_cpu_ones(monkeypatch, tied_pool):
    """The GPU path's slicing, offsets and merge, run on CPU: faiss-gpu itself is not tested here."""
    import types

    import faiss

    devices = []

    def flat_index(resources, dim, config):
        assert config.useFloat16 is True
        devices.append(config.device)
        return faiss.IndexFlatIP(dim)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 3, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", types.SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatIP", flat_index, raising=False)
    queries, candidates = tied_pool
    want_scores, want_ids = brute_force(queries, candidates, 10)
    scores, ids = search(queries, [candidates[:150], candidates[150:]], 10, chunk_size=100)
    assert devices == [0, 1, 2]
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


def test_pool_is_never_converted_to_fp32_wholesale():
    import tracemalloc

    rng = np.random.default_rng(3)
    candidates = rng.standard_normal((80000, 64)).astype(np.float16)  # 10 MB; 20 MB as fp32
    queries = rng.standard_normal((8, 64)).astype(np.float16)
    tracemalloc.start()
    try:
        search(queries, candidates, 10, chunk_size=1000, use_gpu=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < candidates.nbytes // 4  # a 1000-row fp32 chunk is 256 KB


def test_faiss_block_sizes_are_restored_after_a_search():
    import faiss

    before = (faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs)
    search(np.ones((30, 4), np.float16), np.ones((50, 4), np.float16), 3, chunk_size=20, use_gpu=False)
    assert (faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs) == before


def test_embedding_search_renormalises_fp16_vectors_as_the_reference_scorer():
    """fp16 rounding leaves unit vectors with norms 1 +- 1e-3: a longer but less aligned
    candidate can outscore a better aligned one by raw inner product. search_ids ranks by
    cosine in fp32, as UniIR does after faiss.normalize_L2."""
    from umarvel.retrieval.index import search_ids

    query = np.array([[1.0, 0.0]], dtype=np.float16)
    aligned = np.array([0.999, 0.0447], dtype=np.float32)  # cosine 0.999
    longer = np.array([0.9985, 0.0548], dtype=np.float32) * 1.002  # cosine 0.99849, raw product 1.0005
    candidates = np.stack([longer, aligned]).astype(np.float16)
    _, raw = search(query, candidates, 2, use_gpu=False)
    scores, ids = search_ids(query, candidates, ["longer", "aligned"], 2, use_gpu=False)
    assert raw.tolist() == [[0, 1]]
    assert ids == [["aligned", "longer"]]
    unit = candidates.astype(np.float32) / np.linalg.norm(candidates.astype(np.float32), axis=1, keepdims=True)
    np.testing.assert_allclose(scores[0], unit[[1, 0], 0], rtol=1e-6)


def test_a_sharded_search_with_progress_reports_its_rate_and_keeps_its_result(tied_pool, capsys, monkeypatch):
    from umarvel import progress
    from umarvel.retrieval.index import search_ids

    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # the bar; off a terminal: tests/test_progress.py

    queries, pool = tied_pool
    shards = [pool[:300], pool[300:]]
    ids = [f"0:{i}" for i in range(len(pool))]
    quiet = search_ids(queries, shards, ids, 5, use_gpu=False)
    shown = search_ids(queries, shards, ids, 5, use_gpu=False, progress=True)
    bar = capsys.readouterr().err
    assert "search 40 queries: 100%" in bar and "1.00k/1.00k" in bar and "cand/s" in bar
    np.testing.assert_array_equal(quiet[0], shown[0])
    assert quiet[1] == shown[1]
