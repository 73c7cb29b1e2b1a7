"""Sharded, cached, resumable encoding of query sets and candidate pools.

An encoded set lives in `<cache>/<fingerprint>/<name>/`:
    shard-00000.npy        fp16 (rows, d) unit vectors
    shard-00000.ids.txt    one id per row, same order
    manifest.json          written last: fingerprint, rows, dim, the shard list
Each shard is written atomically, so a killed run resumes from its finished shards; under a
launcher, shard i is encoded by rank i mod world size. The fingerprint covers the model
weights, the prompt/pooling config and the source files, so a changed model, prompt or data
file never re-uses stale vectors, and an unchanged one never re-encodes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from umarvel import process
from umarvel.config import to_dict
from umarvel.errors import DataError
from umarvel.evaluation.protocol import ItemSet
from umarvel.io import atomic_path, atomic_write_json

logger = logging.getLogger("umarvel")
MANIFEST = "manifest.json"
SAMPLE_BYTES = 1 << 20
WHOLE_FILE_LIMIT = 64 << 20
# Items handed to Embedder.encode at once: it sorts them by length, so larger blocks pad less.
BATCHES_PER_BLOCK = 16
# Model config fields that cannot change an embedding; everything else is fingerprinted.
NOT_AFFECTING_EMBEDDINGS = {"device", "gradient_checkpointing", "temperature", "backbone", "lora"}


def file_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a file: whole for small files, size + sampled blocks + mtime for large ones."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: handle.read(SAMPLE_BYTES), b""):
                digest.update(block)
        else:
            digest.update(str(path.stat().st_mtime_ns).encode())
            for offset in (0, size // 2, max(0, size - SAMPLE_BYTES)):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def weights_fingerprint(directory: str | os.PathLike) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest.update(file_fingerprint(path).encode())
    return digest.hexdigest()


def model_fingerprint(embedder) -> str:
    """Weights (backbone + adapter, or merged) and every config field that shapes an embedding."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(weights_fingerprint(embedder.settings.backbone).encode())
    if embedder.has_adapter:
        for name, tensor in sorted(embedder.backbone.state_dict().items()):
            if "lora_" in name:
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
    relevant = {k: v for k, v in to_dict(embedder.settings).items() if k not in NOT_AFFECTING_EMBEDDINGS}
    digest.update(json.dumps(relevant, sort_keys=True).encode())
    return digest.hexdigest()


def set_fingerprint(model: str, sources: Sequence[str | os.PathLike]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(model.encode())
    for source in sources:
        digest.update(file_fingerprint(source).encode())
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


def load_encoded(directory: str | os.PathLike) -> EncodedSet | None:
    """The finished set in `directory`, or None when its manifest is not written yet."""
    directory = Path(directory)
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    shards, ids = [], []
    for shard in manifest["shards"]:
        shards.append(np.load(directory / shard["file"], mmap_mode="r"))
        ids.extend((directory / shard["ids"]).read_text().splitlines())
    return EncodedSet(directory, shards, ids)


def _finished_shard(directory: Path, index: int, start: int, stop: int, items, id_key: str) -> bool:
    """Shard `index` was written with these bounds. An interrupted run with another shard_size
    left shards of other bounds under the same names; re-using them would drop or repeat items."""
    ids_file = directory / f"shard-{index:05d}.ids.txt"
    if not (directory / f"shard-{index:05d}.npy").is_file() or not ids_file.is_file():
        return False
    ids = ids_file.read_text().splitlines()
    return len(ids) == stop - start and ids[0] == items(start, start + 1)[0][id_key]


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
    desc: str = "encode",
    progress: bool = True,
) -> EncodedSet:
    """Encode `count` items (fetched by `items(start, stop)`) into fp16 shards in `directory`.

    Re-uses a finished set and the finished shards of an interrupted one. Every rank of a
    launched job must call this; each encodes its own shards, rank 0 writes the manifest.
    """
    directory = Path(directory)
    finished = load_encoded(directory)
    if finished is not None:
        return finished
    rank, world = process.rank(), process.world_size()
    bounds = [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]
    mine = [i for i in range(len(bounds)) if i % world == rank]
    todo = [i for i in mine if not _finished_shard(directory, i, *bounds[i], items, id_key)]
    bar = tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), desc=desc, unit="item",
               disable=not progress or rank != 0)
    for index in todo:
        start, stop = bounds[index]
        batch = items(start, stop)
        vectors = []
        block = batch_size * BATCHES_PER_BLOCK
        for offset in range(0, len(batch), block):
            chunk = batch[offset : offset + block]
            vectors.append(embedder.encode(chunk, batch_size=batch_size).numpy().astype(np.float16))
            bar.update(len(chunk))
        # Ids last, after removing a leftover ids file: an ids file that passes the resume check
        # then always sits beside the vectors written with it.
        ids_file = directory / f"shard-{index:05d}.ids.txt"
        ids_file.unlink(missing_ok=True)
        with atomic_path(directory / f"shard-{index:05d}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float16))
        with atomic_path(ids_file) as tmp:
            tmp.write_text("".join(f"{item[id_key]}\n" for item in batch))
    bar.close()
    process.barrier()
    if rank == 0:
        shards = [{"file": f"shard-{i:05d}.npy", "ids": f"shard-{i:05d}.ids.txt", "rows": stop - start}
                  for i, (start, stop) in enumerate(bounds)]
        atomic_write_json(directory / MANIFEST, {"fingerprint": fingerprint, "rows": count, "shards": shards})
    process.barrier()
    return load_encoded(directory)


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
        """The set's vectors, fingerprinted by its sources; a union set is its parts' shards."""
        if item_set.parts:
            return concatenate([self.encode(part) for part in item_set.parts])
        fingerprint = set_fingerprint(self.model, item_set.sources)
        return encode_set(
            self.embedder, item_set.items, len(item_set), item_set.id_key,
            self.root / f"{item_set.name}-{fingerprint}", fingerprint=fingerprint,
            shard_size=self.config.shard_size, batch_size=self.config.batch_size,
            desc=f"encode {item_set.name}", progress=self.progress,
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
                       [Path(source) for source in sources], "qid")
    return ItemSet(name, [qids[i] for i in rows],
                   lambda start, stop: [queries.item(rows[i], use_instruction=use_instruction) for i in range(start, stop)],
                   [Path(source) for source in sources], "qid")


def pool_set(name: str, pool, source: str | os.PathLike) -> ItemSet:
    """An M-BEIR candidate pool as an item set."""
    return ItemSet(name, pool.table.column("did").to_pylist(), lambda start, stop: list(pool.items(start, stop)),
                   [Path(source)], "did")


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
