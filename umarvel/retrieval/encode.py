"""Sharded, cached, resumable encoding of query sets and candidate pools.

An encoded set lives in `<cache>/<model fingerprint>/<name>-<set fingerprint>/`:
    shard-00000.npy        fp16 (rows, d) unit vectors
    shard-00000.checksum   SHA-256 of the ids file and the vector bytes, taken before writing
    shard-00000.ids.txt    one id per row, same order
    manifest.json          written last: format, fingerprint, rows, dim, the shard list (with checksums)
Each shard is written atomically (vectors, checksum, then ids, each renamed into place), so a
killed run resumes from its finished shards; under a launcher, shard i is encoded by rank i mod
world size.

What is loaded is verified (manifest schema, rows and dim of every shard, one id per vector,
finite unit norms, the checksum): a damaged entry is a CacheError naming the directory to
delete, never silently shifted ids, swapped rows or zero vectors. The norm check reads the
whole shard (~0.6 GB/s on one core; the checksum adds ~20%, BENCHMARKS.md), so both run once
per version of a shard's files: on the vectors in memory when a shard is written (an encoder
giving NaN is an error then, not a damaged cache later), and on load only for a pair of files
not noted as checked under the cache root by their stat signatures, which any rewrite (even
one that sets the mtime back) changes.

The fingerprints cover what shapes a vector, so a change never re-uses stale vectors:
  model: every top-level file of the backbone directory (weights, config, tokenizer,
    processor, chat template) by content; the adapter's LoRA tensors and its PEFT config; the
    model settings but device and the training-only ones (a model.rules.marker_rows file by
    content); the profile's resolved rules (its batching: 'file:N' vectors depend on their
    batch); the dtype the weights are in (auto means bf16 on CUDA and fp32 on CPU); CACHE_FORMAT.
  set: the model fingerprint, the source files (queries or pool, instructions) by content,
    and every image the items name by (path under the root, size, mtime_ns).
File contents are hashed whole, once: the digest is kept under the cache root keyed by
(path, size, mtime_ns, ctime_ns, inode), and ctime changes with any write or mtime reset, so a
later run costs one stat per file. Images are not read (a 5.6M pool names millions): an image
rewritten with the same size and its mtime set back is the one edit not seen; delete the
set's directory after such an edit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from umarvel import process
from umarvel.config import ConfigError, to_dict
from umarvel.errors import CacheError, DataError, UmarvelError
from umarvel.evaluation.protocol import ItemSet
from umarvel.io import atomic_path, atomic_write_json, atomic_write_text
from umarvel.profiles import marker_source
from umarvel.progress import progress_bar

logger = logging.getLogger("umarvel")
MANIFEST = "manifest.json"
# Bumped when what a cache entry holds, or how its fingerprints are made, changes (3: per-shard
# checksums). The model fingerprint includes it, so entries of an older format are not found
# and their sets are encoded afresh into new directories.
CACHE_FORMAT = 3
HASH_BLOCK = 1 << 22
# fp16 rounding moves a unit vector's norm by ~1e-3; anything further is damage.
NORM_TOLERANCE = 1e-2
# Elements converted to fp32 at once by the norm check (64 MB).
VERIFY_ELEMENTS = 1 << 24
# Model config fields that cannot change an embedding; everything else is fingerprinted.
# dtype is replaced by the dtype the weights are loaded in; lora by the loaded adapter's config.
NOT_AFFECTING_EMBEDDINGS = {"device", "dtype", "gradient_checkpointing", "temperature", "backbone", "lora"}


def _stat_memo(kind: str, *paths: Path) -> Path:
    """Where a fact about `paths` is kept under the cache root, keyed by their stat signatures:
    any write, replacement or mtime reset changes ctime or inode, so the fact is then re-derived."""
    signature: list = [kind]
    for path in paths:
        stat = path.stat()
        signature += [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    return process.cache_root() / "hashes" / hashlib.blake2b(json.dumps(signature).encode(), digest_size=16).hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of the whole file, memoised by its stat signature."""
    path = Path(path)
    memo = _stat_memo("content", path)
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    value = digest.hexdigest()
    atomic_write_text(memo, value)
    return value


def directory_fingerprint(directory: str | os.PathLike) -> str:
    """Every top-level file of a model directory (weights, configs, tokenizer, processor)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        digest.update(f"{path.name}:{file_fingerprint(path)}\n".encode())
    return digest.hexdigest()


def images_fingerprint(root: str | os.PathLike, paths: Iterable[str | None]) -> str:
    """The images items name (relative to `root`), by size and mtime: one stat each."""
    digest = hashlib.blake2b(digest_size=16)
    for relative in paths:
        if not relative:
            continue
        try:
            stat = os.stat(os.path.join(root, relative))
            digest.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:  # reading the item reports it; here it only has to change the fingerprint
            digest.update(f"{relative}:missing\n".encode())
    return digest.hexdigest()


def query_images(queries) -> str:
    """`images_fingerprint` of every image a query file (`mbeir.Queries`) names."""
    return images_fingerprint(queries.root, _values(queries.table.column("query_img_path")))


def pool_images(pool) -> str:
    """`images_fingerprint` of every image a candidate pool (`mbeir.CandidatePool`) names."""
    return images_fingerprint(pool.root, _values(pool.table.column("img_path")))


def _values(column) -> Iterable[str | None]:
    """A table column's values chunk by chunk (a 5.6M-row pool never becomes one Python list)."""
    for chunk in column.chunks:
        yield from chunk.to_pylist()


def model_fingerprint(embedder) -> str:
    """The backbone directory, the adapter (tensors and config), the loaded dtype, every model
    setting that shapes an embedding (a marker-rows file by content) and the resolved profile
    rules, the batching among them."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format {CACHE_FORMAT}\n".encode())
    digest.update(directory_fingerprint(embedder.settings.backbone).encode())
    if embedder.has_adapter:
        adapters = {name: config.to_dict() for name, config in embedder.backbone.peft_config.items()}
        digest.update(json.dumps(adapters, sort_keys=True, default=_stable).encode())
        for name, tensor in sorted(embedder.backbone.state_dict().items()):
            if "lora_" in name:
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
    relevant = {k: v for k, v in to_dict(embedder.settings).items() if k not in NOT_AFFECTING_EMBEDDINGS}
    relevant["loaded_dtype"] = str(embedder.dtype)
    # the rules the profile resolved to (batching, text format, ...), not only the overrides given
    relevant["rules"] = asdict(embedder.rules)
    markers = embedder.settings.rules.marker_rows
    if markers and isinstance(marker_source(markers), Path):  # a file of rows: by content, like the backbone's files
        relevant["marker_rows_file"] = file_fingerprint(markers)
    digest.update(json.dumps(relevant, sort_keys=True).encode())
    return digest.hexdigest()


def _stable(value) -> object:
    """JSON form of what PEFT configs hold besides JSON types: a set (target_modules) sorted,
    since its str order changes with each process's hash seed and ranks must agree on the key."""
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def set_fingerprint(model: str, sources: Sequence[str | os.PathLike], images: str = "") -> str:
    """`images` is an `images_fingerprint` of the images the set's items name."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(model.encode())
    for source in sources:
        digest.update(f"{Path(source).name}:{file_fingerprint(source)}\n".encode())
    digest.update(images.encode())
    return digest.hexdigest()


@dataclass
class EncodedSet:
    """Encoded vectors as memory-mapped fp16 shards, and their ids in order."""

    directory: Path
    shards: list[np.ndarray]
    ids: list[str]

    @property
    def dim(self) -> int:
        return self.shards[0].shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, index: int) -> np.ndarray:
        """Vector `index`, counted across the shards."""
        for shard in self.shards:
            if index < len(shard):
                return shard[index]
            index -= len(shard)
        raise IndexError(index)

    def vectors(self) -> np.ndarray:
        """All vectors in one array (for query sets; pools stay sharded)."""
        return np.concatenate(self.shards) if len(self.shards) > 1 else self.shards[0]


def _damaged(directory: Path, what: str) -> CacheError:
    return CacheError(f"{what}: the embedding cache entry is damaged; delete {directory} and run again "
                      "(that set is encoded afresh)")


def _read_manifest(directory: Path) -> dict | None:
    """The manifest, checked against its schema; None when it is not written yet."""
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged(directory, f"{manifest_file}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise _damaged(directory, f"{manifest_file}: format {found!r}, expected {CACHE_FORMAT}")
    shards = manifest.get("shards")
    fields_ok = (isinstance(manifest.get("fingerprint"), str) and _count(manifest.get("rows"))
                 and _count(manifest.get("dim")) and isinstance(shards, list))
    if fields_ok:
        fields_ok = all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("ids"), str)
                        and _count(s.get("rows")) and isinstance(s.get("checksum"), str)
                        and "/" not in s["file"] + s["ids"] for s in shards)
    if not fields_ok:
        raise _damaged(directory, f"{manifest_file}: expected fingerprint, rows, dim and shards "
                                  "(each with file, ids, rows, checksum)")
    if sum(s["rows"] for s in shards) != manifest["rows"]:
        raise _damaged(directory, f"{manifest_file}: its shards hold {sum(s['rows'] for s in shards)} rows, "
                                  f"it says {manifest['rows']}")
    return manifest


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _open_shard(directory: Path, shard: dict, dim: int) -> tuple[np.ndarray, list[str]]:
    """One shard's vectors (memory-mapped) and ids, verified against the manifest entry."""
    file, ids_file, rows = directory / shard["file"], directory / shard["ids"], shard["rows"]
    try:
        vectors = np.load(file, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise _damaged(directory, f"{file}: not a readable .npy file ({err})") from None
    if vectors.dtype != np.float16 or vectors.shape != (rows, dim):
        raise _damaged(directory, f"{file}: holds {vectors.dtype} {vectors.shape}, the manifest says float16 "
                                  f"({rows}, {dim})")
    try:
        ids_text = ids_file.read_bytes()
        ids = ids_text.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise _damaged(directory, f"{ids_file}: not readable ({err})") from None
    if len(ids) != rows or not all(ids):
        raise _damaged(directory, f"{ids_file}: {len(ids)} lines ({sum(not i for i in ids)} empty) "
                                  f"for {rows} vectors")
    verified = _stat_memo(f"verified {shard['checksum']}", file, ids_file)
    if not verified.is_file():
        bad = _first_bad_row(vectors)
        if bad is not None:
            raise _damaged(directory, f"{file}: row {bad[0]} has norm {bad[1]:.4g} (unit vectors expected)")
        found = shard_checksum(ids_text, vectors)
        if found != shard["checksum"]:
            raise _damaged(directory, f"{file} with {ids_file}: checksum {found}, the manifest recorded "
                                      f"{shard['checksum']} when they were written (rows reordered, replaced or edited)")
        atomic_write_text(verified, "verified\n")
    return vectors, ids


def shard_checksum(ids_text: bytes, vectors: np.ndarray) -> str:
    """SHA-256 (first 128 bits) of a shard's id file and its fp16 vector bytes, in row order: rows
    swapped (ids and vectors together, or either alone), replaced or edited change it, where the
    norm check sees no swap of unit vectors. SHA-256 because OpenSSL runs it on the CPU's SHA
    instructions: 6x blake2b's speed on Python 3.11, 5x the norm check's (BENCHMARKS.md)."""
    digest = hashlib.sha256(ids_text)
    digest.update(np.ascontiguousarray(vectors, dtype=np.float16))
    return digest.hexdigest()[:32]


def _first_bad_row(vectors: np.ndarray) -> tuple[int, float] | None:
    """(row, norm) of the first row that is not a finite unit vector, or None."""
    block = max(1, VERIFY_ELEMENTS // max(vectors.shape[1], 1))
    for start in range(0, len(vectors), block):
        norms = np.linalg.norm(np.asarray(vectors[start : start + block], dtype=np.float32), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))
        if len(bad):
            return start + int(bad[0]), float(norms[bad[0]])
    return None


def load_encoded(directory: str | os.PathLike, fingerprint: str | None = None) -> EncodedSet | None:
    """The finished, verified set in `directory`, or None when its manifest is not written yet."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest is None:
        return None
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
        raise _damaged(directory, f"{directory / MANIFEST}: fingerprint {manifest['fingerprint']}, "
                                  f"expected {fingerprint}")
    shards, ids = [], []
    for shard in manifest["shards"]:
        vectors, shard_ids = _open_shard(directory, shard, manifest["dim"])
        shards.append(vectors)
        ids.extend(shard_ids)
    return EncodedSet(directory, shards, ids)


def _finished_shard(directory: Path, index: int, start: int, stop: int, items, id_key: str) -> bool:
    """Shard `index` was written with these bounds (and its checksum). An interrupted run with
    another shard_size left shards of other bounds under the same names; re-using them would drop
    or repeat items. Its rows are verified with the whole set when the manifest is read back."""
    ids_file = directory / f"shard-{index:05d}.ids.txt"
    if not (directory / f"shard-{index:05d}.npy").is_file() or not ids_file.is_file():
        return False
    if _written_checksum(directory, index) is None:
        return False
    try:
        rows = np.load(directory / f"shard-{index:05d}.npy", mmap_mode="r").shape[0]
        ids = ids_file.read_text().splitlines()
    except (OSError, ValueError, EOFError, UnicodeDecodeError):
        return False
    return rows == len(ids) == stop - start and ids[0] == items(start, start + 1)[0][id_key]


def _checksum_file(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.checksum"


def _written_checksum(directory: Path, index: int) -> str | None:
    """The checksum shard `index` was written with (the manifest collects them), or None."""
    try:
        return _checksum_file(directory, index).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _write_shard(directory: Path, index: int, vectors: np.ndarray, ids: list[str]) -> None:
    """Vectors, their checksum, then ids, each renamed into place; the ids file (which the resume
    check reads) is removed first, so a finished-looking shard always belongs together. A shard
    that does not hold one finite unit vector per id is never written; one that does is noted as
    checked."""
    if vectors.ndim != 2 or len(vectors) != len(ids) or not len(ids):
        raise UmarvelError(f"{directory}: shard {index} would hold {vectors.shape} vectors for {len(ids)} items; "
                           "nothing was written (check encode.batch_size and encode.shard_size)")
    vectors = vectors.astype(np.float16, copy=False)
    bad = _first_bad_row(vectors)
    if bad is not None:
        raise UmarvelError(f"{directory}: the encoder gave item {ids[bad[0]]} a vector of norm {bad[1]:.4g} (NaN, "
                           "inf or zero); nothing was written. float16 weights overflow on some inputs: try "
                           "model.dtype=bfloat16 or float32")
    ids_file, vectors_file = directory / f"shard-{index:05d}.ids.txt", directory / f"shard-{index:05d}.npy"
    ids_text = "".join(f"{i}\n" for i in ids).encode("utf-8")
    checksum = shard_checksum(ids_text, vectors)
    ids_file.unlink(missing_ok=True)
    with atomic_path(vectors_file) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, vectors)
    atomic_write_text(_checksum_file(directory, index), checksum + "\n")
    with atomic_path(ids_file) as tmp:
        tmp.write_bytes(ids_text)
    atomic_write_text(_stat_memo(f"verified {checksum}", vectors_file, ids_file), "verified\n")


def encode_set(
    embedder,
    items: Callable[[int, int], list[dict]],
    count: int,
    id_key: str,
    directory: str | os.PathLike,
    *,
    fingerprint: str,
    shard_size: int = 50_000,
    batch_size: int = 32,
    num_workers: int | None = None,
    desc: str = "encode",
    progress: bool = True,
) -> EncodedSet:
    """Encode `count` items (fetched by `items(start, stop)`) into fp16 shards in `directory`.

    Re-uses a finished set and the finished shards of an interrupted one. Every rank of a
    launched job must call this; each encodes its own shards with its own `num_workers` input
    workers (see Embedder.encode), rank 0 writes the manifest and shows the progress.
    """
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"encode.shard_size={shard_size}, encode.batch_size={batch_size}: both must be >= 1")
    directory = Path(directory)
    finished = load_encoded(directory, fingerprint)
    if finished is not None:
        return finished
    rank, world = process.rank(), process.world_size()
    bounds = [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]
    mine = [i for i in range(len(bounds)) if i % world == rank]
    todo = [i for i in mine if not _finished_shard(directory, i, *bounds[i], items, id_key)]
    bar = progress_bar(sum(bounds[i][1] - bounds[i][0] for i in todo), desc, "item",
                       enabled=progress and rank == 0)
    for index in todo:
        start, stop = bounds[index]
        batch = items(start, stop)
        vectors = embedder.encode(batch, batch_size=batch_size, num_workers=num_workers, bar=bar)
        _write_shard(directory, index, vectors, [item[id_key] for item in batch])
    bar.close()
    process.barrier()
    if rank == 0:
        shards = [{"file": f"shard-{i:05d}.npy", "ids": f"shard-{i:05d}.ids.txt", "rows": stop - start,
                   "checksum": _written_checksum(directory, i)} for i, (start, stop) in enumerate(bounds)]
        missing = [i for i, shard in enumerate(shards) if shard["checksum"] is None]
        if missing:
            raise _damaged(directory, f"{_checksum_file(directory, missing[0])}: missing or unreadable")
        dim = int(np.load(directory / shards[0]["file"], mmap_mode="r").shape[1]) if shards else 0
        atomic_write_json(directory / MANIFEST, {"format": CACHE_FORMAT, "fingerprint": fingerprint, "rows": count,
                                                 "dim": dim, "shards": shards})
    process.barrier()
    return load_encoded(directory, fingerprint)


def default_embedding_cache() -> Path:
    return process.cache_root() / "embeddings"


class EmbeddingCache:
    """Encode named item sets of one embedder into the shared cache, each at most once."""

    def __init__(self, embedder, config, *, progress: bool = True):
        """`config` holds the encoding settings: batch_size, shard_size, cache_dir."""
        self.embedder, self.config, self.progress = embedder, config, progress
        self.model = model_fingerprint(embedder)
        self.root = Path(config.cache_dir or default_embedding_cache()) / self.model
        if process.is_main_process():  # it can grow large (40 GB for the 7B global pool): say where
            logger.info("embedding cache: %s (re-used by later runs of this model; safe to delete)", self.root.absolute())

    def encode(self, item_set: ItemSet) -> EncodedSet:
        """The set's vectors, fingerprinted by its sources; a union set is its parts' shards.
        An empty set is refused before anything is written: it would be cached as a set of no
        shards, and searching it fails far from the file that was empty."""
        if not len(item_set):
            raise DataError(f"item set {item_set.name!r} is empty: nothing to encode or search (read from "
                            f"{', '.join(map(str, item_set.sources)) or 'no file'})")
        if item_set.parts:
            return concatenate([self.encode(part) for part in item_set.parts])
        fingerprint = set_fingerprint(self.model, item_set.sources, item_set.images() if item_set.images else "")
        shard_size, fixed = self.config.shard_size, self.embedder.rules.fixed_batch
        if fixed:  # shards hold whole batches, so the set's batches are those of one pass over the file
            shard_size = -(-shard_size // fixed) * fixed
        return encode_set(
            self.embedder, item_set.items, len(item_set), item_set.id_key,
            self.root / f"{item_set.name}-{fingerprint}", fingerprint=fingerprint,
            shard_size=shard_size, batch_size=self.config.batch_size,
            num_workers=self.config.num_workers, desc=f"encode {item_set.name}", progress=self.progress,
        )

    def queries(self, name: str, queries, sources: Sequence[str | os.PathLike]) -> EncodedSet:
        return self.encode(query_set(name, queries, sources, self.embedder.settings.prompt.use_instruction))

    def pool(self, name: str, pool, source: str | os.PathLike) -> EncodedSet:
        return self.encode(pool_set(name, pool, source))


def query_set(name: str, queries, sources: Sequence[str | os.PathLike], use_instruction: bool,
              rows: Sequence[int] | None = None) -> ItemSet:
    """An M-BEIR query file (or its `rows`) as an item set, with the evaluation-time (per-qid)
    instructions."""
    qids = queries.table.column("qid").to_pylist()
    if rows is None:
        return ItemSet(name, qids, lambda start, stop: list(queries.items(start, stop, use_instruction=use_instruction)),
                       [Path(source) for source in sources], "qid", images=lambda: query_images(queries))
    return ItemSet(name, [qids[i] for i in rows],
                   lambda start, stop: [queries.item(rows[i], use_instruction=use_instruction) for i in range(start, stop)],
                   [Path(source) for source in sources], "qid", images=lambda: query_images(queries))


def pool_set(name: str, pool, source: str | os.PathLike) -> ItemSet:
    """An M-BEIR candidate pool as an item set."""
    return ItemSet(name, pool.table.column("did").to_pylist(), lambda start, stop: list(pool.items(start, stop)),
                   [Path(source)], "did", images=lambda: pool_images(pool))


def concatenate(sets: Sequence[EncodedSet]) -> EncodedSet:
    """The union of encoded sets: their shards in order, never copied; ids must be unique."""
    ids = [i for encoded in sets for i in encoded.ids]
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for i in ids:
            if i in seen:
                duplicates.append(i)
            seen.add(i)
        raise DataError(f"the sets share ids {duplicates[:5]}: their union needs unique ids")
    return EncodedSet(sets[0].directory.parent, [shard for encoded in sets for shard in encoded.shards], ids)
