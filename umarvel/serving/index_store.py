"""A built search index on disk: FAISS index, ids, metadata and the manifest that binds them to a model.

    INDEX/
      index.faiss      faiss.write_index of any factory string (inner product over unit vectors)
      ids.txt          one id per vector, in index order
      metadata.jsonl   one JSON object per vector: the item's fields but its id
      umarvel_index.json   the manifest, below

The directory is written beside its final place and renamed into it when complete
(`io.atomic_dir`), so an interrupted build leaves the previous index (or none), never half of
one; the encoding it spent the time on stays in the embedding cache, so building again resumes.

ids and metadata are read through line offsets over a memory map: a 5.6M-item index costs one
int64 per line in memory, not millions of Python strings.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.errors import UmarvelError
from umarvel.io import atomic_dir, atomic_write_json
from umarvel.retrieval.index import faiss, normalized_fp32

MANIFEST = "umarvel_index.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
METADATA_FILE = "metadata.jsonl"
FORMAT = 1
# Vectors an IVF / PQ index is trained on at most (faiss wants 39-256 per centroid): a seeded sample.
TRAIN_SAMPLE = 262_144
# Rows converted to fp32 and added to the index at once.
ADD_CHUNK = 65_536


@dataclass(frozen=True)
class IndexManifest:
    """What an index was built from: the model (path and fingerprint), its embedding profile, the
    vector dimension, the faiss factory string, the number of vectors, the corpus file, and the
    faiss search parameters used unless a search gives its own (e.g. "nprobe=16")."""

    model: str
    fingerprint: str
    profile: str
    dim: int
    index_type: str
    count: int
    corpus: str
    search_params: str = ""
    format: int = FORMAT

    @property
    def size(self) -> int:
        return self.count

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "IndexManifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UmarvelError(f"{directory} is not a umarvel index (no {MANIFEST}); build one with `umarvel index build`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = cls(**data)
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise UmarvelError(f"{path}: not a readable index manifest ({err}); build the index again") from None
        if manifest.format != FORMAT:
            raise UmarvelError(f"{path}: index format {manifest.format}, this umarvel reads {FORMAT}; build it again")
        return manifest


class LineFile:
    """The lines of a text file by number, through a memory map and one offset per line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(handle.fileno()).st_size \
                else b""
        ends = np.flatnonzero(np.frombuffer(self._map, dtype=np.uint8) == ord("\n")) if len(self._map) else \
            np.empty(0, np.int64)
        self._starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        return self._map[self._starts[index] : self._ends[index]].decode("utf-8")


@dataclass
class OpenIndex:
    """A loaded index: the faiss index (CPU), ids and metadata by row, and the manifest."""

    manifest: IndexManifest
    index: object
    ids: LineFile
    metadata: LineFile


def open_index(directory: str | os.PathLike) -> OpenIndex:
    """Read an index directory; files that disagree with the manifest are a one-line error."""
    directory = Path(directory)
    manifest = IndexManifest.read(directory)
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
        ids, metadata = LineFile(directory / IDS_FILE), LineFile(directory / METADATA_FILE)
    except (RuntimeError, OSError) as err:
        raise UmarvelError(f"{directory}: index files unreadable ({str(err).splitlines()[0]}); build it again") from None
    counts = {INDEX_FILE: index.ntotal, IDS_FILE: len(ids), METADATA_FILE: len(metadata)}
    if set(counts.values()) != {manifest.count} or index.d != manifest.dim:
        raise UmarvelError(f"{directory}: the manifest says {manifest.count} vectors of dim {manifest.dim}, the files "
                           f"hold {counts} (dim {index.d}); build the index again")
    return OpenIndex(manifest, index, ids, metadata)


def new_faiss_index(index_type: str, dim: int):
    """An empty inner-product faiss index of a factory string ("Flat", "IVF1024,Flat", "HNSW32", ...)."""
    try:
        return faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise UmarvelError(f"--index-type {index_type!r} is not a faiss factory string faiss can build at dim {dim} "
                           f"({_faiss_message(err)}); e.g. Flat, IVF1024,Flat, IVF1024,SQ8, IVF1024,PQ32np, HNSW32") from None


def fill_index(index, shards: list[np.ndarray], *, seed: int = 0, sample: int = TRAIN_SAMPLE, progress=None):
    """Train `index` when it needs it (on a seeded sample of at most `sample` rows), then add every
    row of `shards` in order, each re-normalised to unit length in fp32."""
    total = sum(len(shard) for shard in shards)
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False))
        try:
            index.train(normalized_fp32(_take(shards, rows)))
        except RuntimeError as err:
            raise UmarvelError(f"faiss could not train the index on {len(rows)} vectors ({_faiss_message(err)}): "
                               "choose fewer lists/centroids for this corpus size, or Flat") from None
    for shard in shards:
        for start in range(0, len(shard), ADD_CHUNK):
            chunk = shard[start : start + ADD_CHUNK]
            index.add(normalized_fp32(chunk))
            if progress is not None:
                progress(len(chunk))
    return index


def write_index(out: str | os.PathLike, manifest: IndexManifest, index, ids: list[str], metadata) -> Path:
    """Write the index directory atomically; `metadata` yields one dict per id, in order."""
    with atomic_dir(out, record=MANIFEST, kind="umarvel index") as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        with open(tmp / IDS_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(f"{i}\n" for i in ids)
        with open(tmp / METADATA_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in metadata)
        atomic_write_json(tmp / MANIFEST, asdict(manifest))
    return Path(out)


def _take(shards: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, counted across the shards) gathered into one array."""
    parts, offset = [], 0
    for shard in shards:
        inside = rows[(rows >= offset) & (rows < offset + len(shard))] - offset
        if len(inside):
            parts.append(np.asarray(shard[inside]))
        offset += len(shard)
    return np.concatenate(parts)


def _faiss_message(err: RuntimeError) -> str:
    """The first informative line of a faiss C++ exception."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error"):
            return line
    return lines[-1] if lines else type(err).__name__


def build_index(embedder, corpus, out: str | os.PathLike, *, model: str | os.PathLike, encode_config,
                index_type: str = "Flat", search_params: str = "", progress: bool = True) -> IndexManifest | None:
    """Encode `corpus` (serving.corpus.Corpus) through the embedding cache (resumable, by shards),
    build a faiss index of `index_type` over its unit vectors and write it to `out` with its ids,
    metadata and manifest. `model` is the path the embedder was loaded from (the manifest's default
    for loading the index again). Under a launcher every rank encodes its shards; rank 0 builds and
    writes the index and returns its manifest, the others None."""
    from umarvel.progress import progress_bar
    from umarvel.retrieval.encode import EmbeddingCache

    width = embedder.backbone.config.get_text_config().hidden_size
    set_search_params(new_faiss_index(index_type, width), search_params)  # a bad option fails before encoding
    cache = EmbeddingCache(embedder, encode_config, progress=progress)
    encoded = cache.encode(corpus.items)
    if not process.is_main_process():  # launched: every rank encoded its shards, rank 0 writes the index
        return None
    index = new_faiss_index(index_type, encoded.dim)
    with progress_bar(len(encoded), f"index {index_type}", "vec", enabled=progress) as bar:
        fill_index(index, encoded.shards, progress=bar.update)
    manifest = IndexManifest(model=str(Path(model).absolute()), fingerprint=cache.model,
                             profile=embedder.settings.profile, dim=encoded.dim, index_type=index_type,
                             count=len(encoded), corpus=str(Path(corpus.file).absolute()), search_params=search_params)
    write_index(out, manifest, index, encoded.ids, corpus.metadata(0, len(encoded)))
    return manifest


def set_search_params(index, params: str) -> None:
    """Apply faiss search parameters ("nprobe=16", "efSearch=128", comma-separated) to `index`."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as err:
        raise UmarvelError(f"search parameters {params!r} do not apply to this index ({_faiss_message(err)}): "
                           "IVF indexes take nprobe=N, HNSW ones efSearch=N") from None
