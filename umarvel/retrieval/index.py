"""Exact inner-product top-k search over fp16 embedding pools too large to hold twice.

M-BEIR's global pool is 5.6M x 3584 fp16 (40 GB): converting it to fp32 wholesale would need
80 GB more. On CPU the pool is read one chunk at a time, that chunk alone converted to fp32 and
searched with faiss, and a running top-k is merged across chunks. On GPUs each GPU holds a
contiguous slice of the pool in fp16.

Embeddings are stored as fp16 unit vectors, whose norms are 1 only to about 1e-3: like UniIR's
scorer (faiss.normalize_L2 before searching), `search_ids` re-normalises queries and every
candidate chunk in fp32 before the inner product, so near-ties rank as in the reference scorer.

Ties: on equal scores the lower candidate index ranks first, whatever the chunking. faiss itself
does not promise which of several equal-scored candidates it keeps, so every chunk's top-k is
widened until the k-th place is not tied with the next one (see `_part_top_k`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import numpy as np

from umarvel.errors import UmarvelError
from umarvel.progress import progress_bar

try:
    import faiss
except ImportError as err:  # FAISS is an extra: faiss-cpu and faiss-gpu cannot both be installed
    raise UmarvelError(
        "FAISS is not installed; it comes with an extra: pip install 'umarvel[cpu]' (faiss-cpu) "
        "or 'umarvel[gpu]' (faiss-gpu), or in a clone: pip install -e '.[cpu]'"
    ) from err

# Default fp32 size of one candidate chunk on CPU: small beside the pool, large enough for BLAS.
CHUNK_BYTES = 256 << 20
# Queries converted to fp32 per faiss call.
QUERY_CHUNK = 4096
# faiss GPU k-selection limit (GPU_MAX_SELECTION_K).
GPU_MAX_K = 2048
# faiss's CPU kNN multiplies blocks of 4096 queries by blocks of 1024 candidates by default, and
# every block pair pays a thread fork/join and a heap pass: at d=256 on 2 busy cores that doubled
# the search time. Fewer, larger candidate blocks amortise it; scratch is 1024 x 16384 fp32 = 64 MB.
FAISS_BLOCKS = {"distance_compute_blas_query_bs": 1024, "distance_compute_blas_database_bs": 16384}

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def search(
    queries: np.ndarray,
    candidates: np.ndarray | Sequence[np.ndarray],
    k: int,
    *,
    chunk_size: int | None = None,
    query_chunk_size: int = QUERY_CHUNK,
    use_gpu: bool | str = "auto",
    progress: bool = False,
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidates by inner product for every query, exactly.

    `candidates` is one (n, d) array (np.memmap works) or a sequence of shard arrays whose rows
    are numbered consecutively; shards are never concatenated. `chunk_size` is the number of
    candidate rows converted to fp32 at once on CPU (default: about CHUNK_BYTES). `use_gpu` is
    "auto" (GPUs when faiss sees any), True or False.

    Returns (scores float32, indices int64), both (nq, min(k, n)), best first; on equal scores
    the lower candidate index comes first. With `normalize`, every row is re-scaled to unit
    length in fp32 first (cosine scores whatever the stored precision; zero rows stay zero).
    """
    queries = np.asarray(queries)
    shards = _as_shards(candidates)
    dim = _check_shapes(queries, shards)
    total = sum(len(shard) for shard in shards)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if total == 0:
        raise UmarvelError("the candidate pool is empty")
    k = min(int(k), total)
    if (chunk_size is not None and chunk_size < 1) or query_chunk_size < 1:
        raise ValueError(f"chunk_size and query_chunk_size must be positive, got {chunk_size}, {query_chunk_size}")
    chunk_rows = chunk_size or max(1, CHUNK_BYTES // (4 * dim))

    if gpus_wanted(use_gpu):
        return _search_gpus(queries, shards, k, dim, chunk_rows, query_chunk_size, progress, normalize)
    with progress_bar(total, f"search {len(queries)} queries", "cand", enabled=progress, unit_scale=True) as bar:
        return _search_cpu(queries, shards, k, chunk_rows, query_chunk_size, bar, normalize)


def gpu_choice(setting: str) -> bool | str:
    """The config's yes/no/auto as `search`'s use_gpu."""
    return {"auto": "auto", "yes": True, "no": False}[setting]


def search_ids(
    queries: np.ndarray, candidates: np.ndarray | Sequence[np.ndarray], ids: Sequence[str], k: int, *,
    use_gpu: bool | str = "auto", progress: bool = False,
) -> tuple[np.ndarray, list[list[str]]]:
    """`search` of embeddings (re-normalised in fp32), with candidate rows translated to their
    ids: (scores, ranked ids) per query."""
    scores, indices = search(queries, candidates, k, use_gpu=use_gpu, progress=progress, normalize=True)
    return scores, [[ids[i] for i in row if i >= 0] for row in indices]


def _search_cpu(queries, shards, k, chunk_rows, query_chunk_size, bar, normalize):
    top = _empty_top(len(queries))
    with _faiss_blocks():
        for offset, chunk in _chunks(shards, chunk_rows):
            knn = partial(_flat_knn, _fp32(chunk, normalize))
            scores, ids = _search_part(knn, len(chunk), queries, k, query_chunk_size, normalize)
            top = _merge(top, (scores, ids + offset), k)
            del knn  # one fp32 chunk alive at a time
            bar.update(len(chunk))
    return top


def _flat_knn(matrix: np.ndarray, block: np.ndarray, width: int):
    """Exact inner-product top-`width` of `block` among the rows of `matrix` (fp32)."""
    return faiss.knn(block, matrix, width, faiss.METRIC_INNER_PRODUCT)


@contextmanager
def _faiss_blocks():
    """Set faiss's process-wide kNN block sizes (FAISS_BLOCKS) for one search, then restore them."""
    saved = {name: getattr(faiss.cvar, name) for name in FAISS_BLOCKS}
    try:
        for name, value in FAISS_BLOCKS.items():
            setattr(faiss.cvar, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(faiss.cvar, name, value)


def _search_gpus(queries, shards, k, dim, chunk_rows, query_chunk_size, progress: bool, normalize: bool):
    """Each GPU holds a contiguous slice of the pool in fp16; slices are searched in parallel.
    Progress: candidates copied to the GPUs, then queries searched (summed over the slices)."""
    if k + 1 > GPU_MAX_K:
        raise UmarvelError(f"k={k} is too large for faiss on GPU (k < {GPU_MAX_K}); pass use_gpu=False")
    total = sum(len(shard) for shard in shards)
    gpus = faiss.get_num_gpus()
    slices = {}  # gpu -> (global offset of its slice, its index, its resources: must outlive the index)
    with progress_bar(total, "copy to GPUs", "cand", enabled=progress, unit_scale=True) as bar:
        for offset, chunk in _chunks(shards, min(chunk_rows, -(-total // gpus))):
            gpu = offset * gpus // total
            if gpu not in slices:
                slices[gpu] = (offset, *_gpu_flat_index(gpu, dim))
            slices[gpu][1].add(_fp32(chunk, normalize))
            bar.update(len(chunk))

    with progress_bar(len(queries) * len(slices), f"search {len(slices)} GPUs", "query", enabled=progress) as bar:
        def search_slice(gpu_slice):
            offset, index, _ = gpu_slice
            # Widening stops at the GPU limit: beyond GPU_MAX_K-way ties the lowest-index rule is not kept.
            scores, ids = _search_part(index.search, min(index.ntotal, GPU_MAX_K), queries, k, query_chunk_size,
                                       normalize, done=bar.update)
            return scores, ids + offset

        top = _empty_top(len(queries))
        with ThreadPoolExecutor(max_workers=len(slices)) as pool:
            for result in pool.map(search_slice, slices.values()):
                top = _merge(top, result, k)
    return top


def index_to_gpus(index):
    """A CPU faiss index (Flat or IVF) sharded over every GPU faiss sees, vectors in fp16 as in
    `search`; each GPU holds a contiguous slice and results are merged by faiss. Index types
    faiss has no GPU version of (HNSW) are an UmarvelError: search those on CPU."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = True
    try:
        return faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError as err:
        raise UmarvelError(f"faiss cannot put a {type(index).__name__} on GPUs ({str(err).splitlines()[0]}); "
                           "search it with use_gpu=False") from None


def _gpu_flat_index(gpu: int, dim: int):
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = gpu
    config.useFloat16 = True
    return faiss.GpuIndexFlatIP(resources, dim, config), resources


def _search_part(search_fn: SearchFn, length: int, queries, k: int, query_chunk_size: int, normalize: bool,
                 done: Callable[[int], object] | None = None):
    """Top-k of one slice of the pool for all queries, in blocks of queries; local indices.
    `done(n)` is told after each block of n queries."""
    blocks = []
    for start in range(0, len(queries), query_chunk_size):
        block = _fp32(queries[start : start + query_chunk_size], normalize)
        blocks.append(_part_top_k(search_fn, block, k, length))
        if done is not None:
            done(len(block))
    if not blocks:
        width = min(k, length)
        return np.empty((0, width), np.float32), np.empty((0, width), np.int64)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def _part_top_k(search_fn: SearchFn, block: np.ndarray, k: int, length: int):
    """The k best of one slice, with ties at the k-th place resolved to the lowest indices.

    Asks for one more than k: when the (k+1)-th score equals the k-th, equal-scored candidates
    may have been dropped arbitrarily, so those queries are searched again with twice the width
    until the last returned score is below the k-th (or the whole slice is returned).
    """
    width = min(k + 1, length)
    scores, ids = search_fn(block, width)
    best_scores, best_ids = _best(scores, ids, k)
    if width <= k:
        return best_scores, best_ids
    pending = np.flatnonzero(scores[:, k - 1] == scores[:, k])
    while pending.size:
        width = min(2 * width, length)
        scores, ids = search_fn(block[pending], width)
        resolved = (scores[:, k - 1] > scores[:, -1]) | (width == length)
        rows = pending[resolved]
        best_scores[rows], best_ids[rows] = _best(scores[resolved], ids[resolved], k)
        pending = pending[~resolved]
    return best_scores, best_ids


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best per row: higher score first, lower candidate index on equal scores."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _fp32(rows: np.ndarray, normalize: bool) -> np.ndarray:
    """`rows` as contiguous fp32; with `normalize` a copy scaled to unit L2 norm by faiss (as UniIR does)."""
    if not normalize:
        return np.ascontiguousarray(rows, dtype=np.float32)
    out = np.array(rows, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def _merge(top, part, k: int):
    return _best(np.concatenate([top[0], part[0]], axis=1), np.concatenate([top[1], part[1]], axis=1), k)


def _empty_top(num_queries: int):
    return np.empty((num_queries, 0), np.float32), np.empty((num_queries, 0), np.int64)


def _chunks(shards: Sequence[np.ndarray], rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(global offset, view of at most `rows` rows), never crossing a shard boundary."""
    offset = 0
    for shard in shards:
        for start in range(0, len(shard), rows):
            chunk = shard[start : start + rows]
            yield offset + start, chunk
        offset += len(shard)


def _as_shards(candidates) -> list[np.ndarray]:
    if isinstance(candidates, np.ndarray):
        return [candidates]
    shards = list(candidates)
    if not shards or not all(isinstance(shard, np.ndarray) for shard in shards):
        raise UmarvelError("candidates must be an array or a non-empty sequence of arrays")
    return shards


def _check_shapes(queries: np.ndarray, shards: list[np.ndarray]) -> int:
    if queries.ndim != 2:
        raise UmarvelError(f"queries must be a 2-D array (n, d), got shape {queries.shape}")
    dim = queries.shape[1]
    for number, shard in enumerate(shards):
        if shard.ndim != 2 or shard.shape[1] != dim:
            raise UmarvelError(
                f"candidate shard {number} has shape {shard.shape}, expected (n, {dim}) like the queries: "
                "were queries and candidates encoded by the same model?"
            )
    return dim


def gpus_wanted(use_gpu: bool | str) -> bool:
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    available = faiss.get_num_gpus() > 0
    if use_gpu is True and not available:
        raise UmarvelError("use_gpu=True but faiss sees no GPU (install faiss-gpu, or pass use_gpu=False)")
    return available if use_gpu == "auto" else use_gpu


def normalized_fp32(rows: np.ndarray) -> np.ndarray:
    """`rows` as a contiguous fp32 copy scaled to unit L2 norm (fp16 unit vectors are unit only to ~1e-3)."""
    return _fp32(rows, normalize=True)
