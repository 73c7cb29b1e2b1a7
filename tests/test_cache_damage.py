"""A damaged embedding cache is a CacheError naming the damaged file and the directory to
delete, never shifted ids or silently wrong vectors; a shard that does not hold one unit vector
per item is never written; and every input that shapes a vector (or a parsed table) changes the
cache key, so a stale entry is never re-used.

DAMAGE: 23 classes of damaged cache entry (ids, vectors, manifest), each caught on load, among
them rows swapped inside a shard (ids and vectors together, or either alone), which leave every
count and norm intact and only the checksum recorded at write time sees.
EMPTY_WRITES: 3 classes of encoder output that must not become a finished shard (no vectors,
too few, a NaN one), and 2 classes of encoding setting given in code (shard_size 0,
batch_size -1) refused before any write.
STALE: 6 classes of changed input that must change the key (image bytes, also through the
embedding cache of a pool, a source file edited
with its mtime set back, the table cache under the same edit, the LoRA config, the loaded
dtype, the processor config), and the unchanged case that must keep it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from umarvel.errors import CacheError, UmarvelError
from umarvel.retrieval import encode
from umarvel.retrieval.encode import encode_set, load_encoded

ITEMS = [{"did": f"0:{i}"} for i in range(6)]


@pytest.fixture(autouse=True)
def _own_cache_root(tmp_path, monkeypatch):
    """Content hashes and passed norm checks are noted under the cache root: keep them here."""
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "cache"))

SHARD = "shard-00001"  # the damaged one; shard-00000 stays intact


class IdEmbedder:
    """Item `0:i` -> a unit vector that names i."""

    def encode(self, items, batch_size=32, **options):
        numbers = torch.tensor([float(item["did"].split(":")[1]) for item in items])
        return torch.nn.functional.normalize(torch.stack([torch.ones_like(numbers), numbers], dim=1), dim=1).numpy()


def _encode(directory, embedder=None, fingerprint="f"):
    return encode_set(embedder or IdEmbedder(), lambda start, stop: ITEMS[start:stop], len(ITEMS), "did",
                      directory, fingerprint=fingerprint, shard_size=3, progress=False)


def _rewrite_npy(array):
    def damage(directory):
        np.save(directory / f"{SHARD}.npy", array)
    return damage


def _cut(name, keep):
    def damage(directory):
        path = directory / name
        data = path.read_bytes()
        path.write_bytes(data[: keep(data)])
    return damage


def _edit_ids(edit):
    def damage(directory):
        path = directory / f"{SHARD}.ids.txt"
        path.write_text("".join(f"{line}\n" for line in edit(path.read_text().splitlines())))
    return damage


def _edit_manifest(edit):
    def damage(directory):
        path = directory / encode.MANIFEST
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps(edit(manifest)))
    return damage


def _zeroed_in_place_keeping_mtime(directory):
    """The shard passed its check on the first load; zeroing its rows afterwards, with the mtime
    set back, must still be seen (the noted check is keyed by ctime and inode too)."""
    path = directory / f"{SHARD}.npy"
    load_encoded(directory)
    stat = path.stat()
    vectors = np.load(path, mmap_mode="r+")
    vectors[1] = 0
    vectors.flush()
    del vectors
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _swap_rows(vectors: bool, ids: bool):
    """Rows 0 and 2 of the shard exchanged, in the vectors file, the ids file or both (each
    rewritten in place, so only the row order changes); the shard passed its check before."""
    def damage(directory):
        load_encoded(directory)
        if vectors:
            rows = np.load(directory / f"{SHARD}.npy", mmap_mode="r+")
            rows[[0, 2]] = rows[[2, 0]]
            rows.flush()
            del rows
        if ids:
            _edit_ids(lambda lines: [lines[2], lines[1], lines[0]])(directory)
    return damage


def _header_length(data: bytes) -> int:
    return 10 + int.from_bytes(data[8:10], "little")  # npy v1: magic (6) + version (2) + length (2) + header


# class -> (damage, the file the error must name, what it must say)
DAMAGE = {
    "ids file lost a line": (_edit_ids(lambda ids: ids[:-1]), f"{SHARD}.ids.txt", r"2 lines \(0 empty\) for 3 vectors"),
    "ids file has an empty line": (_edit_ids(lambda ids: ids[:1] + [""] + ids[2:]), f"{SHARD}.ids.txt", "1 empty"),
    "ids file missing": (lambda d: (d / f"{SHARD}.ids.txt").unlink(), f"{SHARD}.ids.txt", "not readable"),
    "ids file not UTF-8": (lambda d: (d / f"{SHARD}.ids.txt").write_bytes(b"\xff\xfe\n\xff\n\xfe\n"),
                           f"{SHARD}.ids.txt", "not readable"),
    "vectors zeroed": (_rewrite_npy(np.zeros((3, 2), np.float16)), f"{SHARD}.npy", "row 0 has norm 0"),
    "vectors zeroed in place, mtime set back": (_zeroed_in_place_keeping_mtime, f"{SHARD}.npy", "row 1 has norm 0"),
    "a NaN row": (_rewrite_npy(np.array([[0.6, 0.8], [np.nan, 0], [1, 0]], np.float16)), f"{SHARD}.npy",
                  "row 1 has norm nan"),
    "vectors not normalised": (_rewrite_npy(np.full((3, 2), 3, np.float16)), f"{SHARD}.npy", "row 0 has norm 4.24"),
    "vectors truncated": (_cut(f"{SHARD}.npy", lambda data: len(data) - 4), f"{SHARD}.npy", "not a readable .npy"),
    "vectors header only": (_cut(f"{SHARD}.npy", _header_length), f"{SHARD}.npy", "not a readable .npy"),
    "vectors file empty": (_cut(f"{SHARD}.npy", lambda data: 0), f"{SHARD}.npy", "not a readable .npy"),
    "vectors missing": (lambda d: (d / f"{SHARD}.npy").unlink(), f"{SHARD}.npy", "not a readable .npy"),
    "vectors of another dim": (_rewrite_npy(np.full((3, 4), 0.5, np.float16)), f"{SHARD}.npy",
                               r"holds float16 \(3, 4\), the manifest says float16 \(3, 2\)"),
    "vectors of another dtype": (_rewrite_npy(np.full((3, 2), 0.5**0.5, np.float32)), f"{SHARD}.npy", "holds float32"),
    "manifest not JSON": (lambda d: (d / encode.MANIFEST).write_text("{garbage"), encode.MANIFEST, "not valid JSON"),
    "manifest of an older format": (_edit_manifest(lambda m: {k: v for k, v in m.items() if k != "format"}),
                                    encode.MANIFEST, "format None, expected"),
    "manifest without dim": (_edit_manifest(lambda m: {k: v for k, v in m.items() if k != "dim"}), encode.MANIFEST,
                             "expected fingerprint, rows, dim and shards"),
    "manifest rows disagree with its shards": (_edit_manifest(lambda m: {**m, "rows": 5}), encode.MANIFEST,
                                               "its shards hold 6 rows, it says 5"),
    "rows swapped, ids and vectors together": (_swap_rows(vectors=True, ids=True), f"{SHARD}.npy",
                                                rf"{SHARD}.ids.txt: checksum \w+, the manifest recorded \w+ when they "
                                                r"were written \(rows reordered"),
    "vectors of two rows swapped": (_swap_rows(vectors=True, ids=False), f"{SHARD}.npy", "rows reordered"),
    "ids of two rows swapped": (_swap_rows(vectors=False, ids=True), f"{SHARD}.ids.txt", "rows reordered"),
    "manifest without a shard's checksum": (_edit_manifest(lambda m: {**m, "shards": [
        {k: v for k, v in shard.items() if k != "checksum"} for shard in m["shards"]]}), encode.MANIFEST,
        r"each with file, ids, rows, checksum"),
    "manifest of another fingerprint": (_edit_manifest(lambda m: {**m, "fingerprint": "other"}), encode.MANIFEST,
                                        "fingerprint other, expected f"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=DAMAGE.keys())
def test_a_damaged_cache_entry_names_the_file_and_the_directory_to_delete(tmp_path, case):
    damage, file, message = DAMAGE[case]
    directory = tmp_path / "set"
    _encode(directory)
    damage(directory)
    with pytest.raises(CacheError, match=message) as err:
        _encode(directory)
    assert str(directory / file) in str(err.value)
    assert f"delete {directory} and run again" in str(err.value)
    shutil.rmtree(directory)  # what the message says to do: the set is encoded afresh
    assert _encode(directory).ids == [item["did"] for item in ITEMS]


class _Recording(IdEmbedder):
    def __init__(self):
        self.encoded: list[str] = []

    def encode(self, items, batch_size=32, **options):
        self.encoded += [item["did"] for item in items]
        return super().encode(items)


def test_a_shard_without_its_checksum_is_encoded_again_on_resume(tmp_path):
    """A run killed between a shard's vectors and its checksum left no finished shard: resuming
    encodes it again, and the manifest then holds every shard's checksum."""
    directory = tmp_path / "set"
    _encode(directory)
    (directory / encode.MANIFEST).unlink()
    (directory / f"{SHARD}.checksum").unlink()
    embedder = _Recording()
    assert _encode(directory, embedder).ids == [item["did"] for item in ITEMS]
    assert embedder.encoded == ["0:3", "0:4", "0:5"]
    manifest = json.loads((directory / encode.MANIFEST).read_text())
    assert all(len(shard["checksum"]) == 32 for shard in manifest["shards"])


class _Returns:
    def __init__(self, rows):
        self.rows = rows

    def encode(self, items, batch_size=32, **options):
        return IdEmbedder().encode(items)[: self.rows]


class _NaN:
    def encode(self, items, batch_size=32, **options):
        vectors = IdEmbedder().encode(items)
        vectors[1] = float("nan")
        return vectors


# class -> (an embedder giving that output for a shard of 3 items, what the error says)
EMPTY_WRITES = {
    "no vectors at all": (_Returns(0), r"shard 0 would hold \(0, 2\) vectors for 3 items; nothing was written"),
    "fewer vectors than items": (_Returns(2), r"shard 0 would hold \(2, 2\) vectors for 3 items; nothing was written"),
    "a NaN vector": (_NaN(), r"the encoder gave item 0:1 a vector of norm nan .*nothing was written.*model\.dtype"),
}


@pytest.mark.parametrize("case", EMPTY_WRITES, ids=EMPTY_WRITES.keys())
def test_a_shard_without_one_unit_vector_per_item_is_never_written(tmp_path, case):
    directory = tmp_path / "set"
    embedder, message = EMPTY_WRITES[case]
    with pytest.raises(UmarvelError, match=message):
        _encode(directory, embedder)
    assert not list(directory.glob("shard-*")) and not (directory / encode.MANIFEST).exists()
    assert load_encoded(directory) is None and len(_encode(directory)) == len(ITEMS)


@pytest.mark.parametrize("sizes", [{"shard_size": 0}, {"batch_size": -1}], ids=["shard_size 0", "batch_size -1"])
def test_encoding_settings_given_in_code_are_checked_before_anything_is_written(tmp_path, sizes):
    """A config file is checked when it is read; an EncodeConfig made in code reaches encode_set."""
    with pytest.raises(UmarvelError, match=r"encode\.shard_size=.*encode\.batch_size=.*both must be >= 1"):
        encode_set(IdEmbedder(), lambda start, stop: ITEMS[start:stop], len(ITEMS), "did", tmp_path / "set",
                   fingerprint="f", progress=False, **{"shard_size": 3, "batch_size": 2, **sizes})
    assert not (tmp_path / "set").exists()


def _same_size_edit_keeping_mtime(path: Path) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_an_image_rewritten_with_the_same_size_changes_the_set_fingerprint(tmp_path):
    image = tmp_path / "images" / "a.jpg"
    image.parent.mkdir()
    image.write_bytes(b"x" * 100)
    before = encode.images_fingerprint(tmp_path, ["images/a.jpg", None])
    assert encode.images_fingerprint(tmp_path, ["images/a.jpg"]) == before  # unchanged: re-used
    image.write_bytes(b"y" * 100)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1_000_000))
    assert encode.images_fingerprint(tmp_path, ["images/a.jpg"]) != before
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "images", moved / "images", copy_function=shutil.copy2)
    # the fingerprint names images relative to the root: a moved tree with the same files keeps it
    assert encode.images_fingerprint(moved, ["images/a.jpg"]) == encode.images_fingerprint(tmp_path, ["images/a.jpg"])


def test_a_pool_whose_image_changed_is_encoded_again_through_the_cache(tmp_path):
    from mini_mbeir import KeywordEmbedder

    from umarvel.config import EncodeConfig
    from umarvel.data.mbeir import open_pool

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x" * 100)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"w")
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text(json.dumps({"did": "1:1", "txt": "alpha", "img_path": "images/a.jpg", "modality": "image,text"})
                         + "\n" + json.dumps({"did": "1:2", "txt": "beta", "img_path": None, "modality": "text"}) + "\n")
    pool = open_pool(pool_file, tmp_path, cache_dir=tmp_path / "tables")
    embedder = KeywordEmbedder(["alpha", "beta"], tmp_path / "weights")
    cache = encode.EmbeddingCache(embedder, EncodeConfig(cache_dir=str(tmp_path / "embeddings")), progress=False)
    first = cache.pool("pool", pool, pool_file)
    assert cache.pool("pool", pool, pool_file).directory == first.directory and embedder.encoded == ["1:1", "1:2"]
    image = tmp_path / "images" / "a.jpg"
    image.write_bytes(b"y" * 100)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1_000_000))
    assert cache.pool("pool", pool, pool_file).directory != first.directory
    assert embedder.encoded == ["1:1", "1:2", "1:1", "1:2"]


def test_a_source_edited_with_its_mtime_set_back_changes_the_file_fingerprint(tmp_path):
    source = tmp_path / "pool.jsonl"
    source.write_bytes(os.urandom(1 << 16))
    before = encode.file_fingerprint(source)
    assert encode.file_fingerprint(source) == before  # memoised
    _same_size_edit_keeping_mtime(source)
    assert encode.file_fingerprint(source) != before


def test_the_table_cache_sees_a_same_size_edit_with_the_mtime_set_back(tmp_path):
    from umarvel.data.mbeir import open_pool

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"did": "1:1", "txt": "alpha", "img_path": None, "modality": "text"}) + "\n")
    assert open_pool(pool, tmp_path, cache_dir=tmp_path / "tables").item(0)["text"] == "Alpha."
    stat = pool.stat()
    pool.write_text(pool.read_text().replace("alpha", "gamma"))
    os.utime(pool, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert open_pool(pool, tmp_path, cache_dir=tmp_path / "tables").item(0)["text"] == "Gamma."


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _fingerprint(model_dir, **overrides):
    from umarvel import Embedder

    torch.manual_seed(0)
    return encode.model_fingerprint(Embedder.from_pretrained(model_dir, device="cpu", **overrides))


def test_the_model_fingerprint_covers_lora_config_dtype_and_processor(model_copy):
    base = _fingerprint(model_copy, trainable=True)
    assert _fingerprint(model_copy, trainable=True) == base  # unchanged: re-used
    assert _fingerprint(model_copy, trainable=True, lora={"alpha": 32}) != base  # same tensors, other scaling
    plain = _fingerprint(model_copy)
    assert _fingerprint(model_copy, dtype="bfloat16") != plain
    assert _fingerprint(model_copy, dtype="auto") == _fingerprint(model_copy, dtype="float32")  # auto on CPU
    processor = model_copy / "processor_config.json"
    settings = json.loads(processor.read_text())
    settings["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    processor.write_text(json.dumps(settings))
    assert _fingerprint(model_copy) != plain
