"""A user's corpus to index: a JSON-lines file of items, or an M-BEIR candidate pool.

Corpus file: one JSON object a line, {"id": str, "text"?: str, "image"?: str, "instruction"?: str,
...any other fields}; an item needs a non-empty text or an image. Image paths are relative to
the corpus root (the file's directory unless given) and confined under it as M-BEIR's are
(`resolve_under`: no absolute paths, no `..`, no symlinks out). Everything but the id is the
item's metadata, returned with each search hit. Texts are encoded as written (as
`Embedder.encode` reads a str), not in M-BEIR's normalised form. The file is parsed once into a memory-mapped
Arrow table (as M-BEIR pools are), so a corpus of millions of items costs no Python dicts.

A file whose first record has M-BEIR's candidate fields (`did`, `modality`) is read as an M-BEIR
pool, its images resolving under the M-BEIR root (the directory above `cand_pool/`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from umarvel.data.arrowtable import (
    OnError, TableFormat, open_table, parse_json_object, read_lines, require_rows,
)
from umarvel.data.files import resolve_under
from umarvel.data.mbeir import open_pool
from umarvel.errors import DataError
from umarvel.evaluation.protocol import ItemSet
from umarvel.retrieval.encode import images_fingerprint, pool_set

CORPUS_FILE = "corpus.jsonl"
ITEM_FIELDS = ("text", "image", "instruction")
_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("image", pa.string()), ("instruction", pa.string()),
    ("metadata", pa.string()), ("line", pa.int64()),
])
CORPUS_FORMAT = TableFormat("umarvel-corpus", _SCHEMA, key="id")


@dataclass
class Corpus:
    """Items to encode (an ItemSet keyed by `id`) and each one's metadata, in the same order."""

    file: Path
    items: ItemSet
    metadata: Callable[[int, int], Iterator[dict]]

    def __len__(self) -> int:
        return len(self.items)


def corpus_file(path: str | os.PathLike) -> Path:
    """FILE itself, or DIR/corpus.jsonl."""
    path = Path(path)
    if path.is_dir():
        path = path / CORPUS_FILE
        if not path.is_file():
            raise DataError(f"a corpus directory holds its items in {CORPUS_FILE} (not found)", str(path.parent))
    elif not path.is_file():
        raise DataError("corpus file not found", str(path))
    return path


def open_corpus(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                symlinks_outside_root: bool = False, cache_dir: str | os.PathLike | None = None,
                on_error: OnError = "raise") -> Corpus:
    """The corpus at `path` (FILE or DIR holding corpus.jsonl); images resolve under `root`."""
    file = corpus_file(path)
    if _is_mbeir_pool(file):
        pool = open_pool(file, root or _mbeir_root(file), cache_dir=cache_dir, on_error=on_error,
                         symlinks_outside_root=symlinks_outside_root)

        def pool_metadata(start: int, stop: int) -> Iterator[dict]:
            for record in pool.table.rows(start, stop):
                yield {"text": record["txt"], "image": record["img_path"], "modality": record["modality"]}

        return Corpus(file, pool_set(f"pool-{file.stem}", pool, file), pool_metadata)

    root = Path(root) if root is not None else file.parent
    table = require_rows(open_table(file, CORPUS_FORMAT, _rows(file), cache_dir=cache_dir, on_error=on_error),
                         "corpus items")

    def items(start: int, stop: int) -> list[dict]:
        return [_item(record, root, str(file), symlinks_outside_root) for record in table.rows(start, stop)]

    def metadata(start: int, stop: int) -> Iterator[dict]:
        for record in table.rows(start, stop):
            yield json.loads(record["metadata"])

    def images() -> str:
        return images_fingerprint(root, (value for chunk in table.column("image").chunks
                                         for value in chunk.to_pylist()))

    item_set = ItemSet(f"corpus-{file.stem}", table.column("id").to_pylist(), items, [file], "id", images=images)
    return Corpus(file, item_set, metadata)


def parse_item(obj: dict, file: str, line: int) -> dict:
    """Validate one corpus record; return its table row. Raises DataError naming the field."""
    if "id" not in obj:
        raise DataError("missing field", file, line, "id")
    if not isinstance(obj["id"], str) or not obj["id"].strip() or "\n" in obj["id"]:
        raise DataError(f"expected a non-empty one-line string id, got {obj['id']!r:.60}", file, line, "id")
    for name in ITEM_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise DataError(f"expected a string or null, got {type(value).__name__} {value!r:.60}", file, line, name)
    text, image = obj.get("text"), obj.get("image")
    if not (text and text.strip()) and not (image and image.strip()):
        raise DataError("an item needs a non-empty text or an image", file, line, "text")
    metadata = {key: value for key, value in obj.items() if key != "id"}
    return {"id": obj["id"], "text": text, "image": image or None, "instruction": obj.get("instruction") or None,
            "metadata": json.dumps(metadata, ensure_ascii=False), "line": line}


def _rows(path: Path):
    def produce(log, meta) -> Iterator[dict]:
        for line, raw in read_lines(path):
            try:
                yield parse_item(parse_json_object(raw, str(path), line), str(path), line)
            except DataError as err:
                log.add(err)

    return produce


def _item(record: dict, root: Path, file: str, symlinks_outside_root: bool) -> dict:
    image = None
    if record["image"]:
        image = resolve_under(root, record["image"], file=file, line=record["line"], field="image",
                              symlinks_outside_root=symlinks_outside_root)
    text = record["text"] if record["text"] and record["text"].strip() else None
    return {"id": record["id"], "text": text, "image": image, "instruction": record["instruction"]}


def _is_mbeir_pool(file: Path) -> bool:
    """Whether the first record has M-BEIR's candidate fields (did, modality) and no `id`."""
    for line, raw in read_lines(file, progress=False):
        obj = parse_json_object(raw, str(file), line)
        return "did" in obj and "modality" in obj and "id" not in obj
    return False


def _mbeir_root(file: Path) -> Path:
    """The M-BEIR root of a pool file: the directory above its `cand_pool/`, else its own."""
    for parent in file.resolve().parents:
        if parent.name == "cand_pool":
            return parent.parent
    return file.parent
