"""Memory-mapped Arrow tables built once from large data files, with lookup by id.

Why: M-BEIR's union train file (1.33M queries) and union pool (5.6M candidates) cost gigabytes
per process as Python dicts, on every rank and in every DataLoader worker. Each source file is
parsed once, streaming, into an Arrow IPC file in a cache directory and then memory-mapped, so
processes share its pages through the OS page cache. Lookup by id goes through a sorted array of
64-bit key hashes (16 bytes per row with the row order) instead of a dict of strings.

A cache entry is keyed by the source's absolute path, size, mtime, ctime and inode, the row
format and CACHE_VERSION: any write to the file, or a replacement, changes ctime or inode even
when it keeps the size and sets the mtime back (`os.utime` itself sets ctime), so a stale table
is never opened; the price is a rebuild after a mere chmod or copy. Hashing the contents
instead would read the whole file (gigabytes for the union pool) in every process on every open.
The entry is built in a temporary directory and renamed into place, so a
half-built cache is never opened and concurrent builders do not collide.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import pyarrow as pa

from umarvel import process
from umarvel.errors import DataError
from umarvel.io import temporary_dir

CACHE_VERSION = 1
BATCH_ROWS = 16_384
PROGRESS_MIN_BYTES = 32 * 2**20
MAX_KEPT_ERRORS = 1000

OnError = Literal["raise", "skip"]


def default_cache_dir() -> Path:
    """$UMARVEL_CACHE/tables, else ~/.cache/umarvel/tables (datasets are often read-only)."""
    return process.cache_root() / "tables"


def stable_hash64(text: str) -> int:
    """A 64-bit hash that is the same in every process and run (unlike the salted `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def progress_bar(total_bytes: int, desc: str, enabled: bool | None = None):
    """A byte-counting progress bar (`umarvel.progress`), shown by default for large files on the
    main process only."""
    from umarvel import progress

    if enabled is None:
        enabled = total_bytes >= PROGRESS_MIN_BYTES and process.is_main_process()
    return progress.progress_bar(total_bytes, desc, "B", enabled=enabled, unit_scale=True)


class ErrorLog:
    """Where bad rows go: raised at once ('raise') or counted and kept for the report ('skip')."""

    def __init__(self, on_error: OnError = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.count = 0
        self.kept: list[DataError] = []

    def add(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.count += 1
        if len(self.kept) < MAX_KEPT_ERRORS:
            self.kept.append(err)


def read_lines(path: str | os.PathLike, progress: bool | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line, with a progress bar."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle, progress_bar(size, Path(path).name, progress) as bar:
        pending = 0
        for number, raw in enumerate(handle, 1):
            pending += len(raw)
            if pending >= 1 << 22:
                bar.update(pending)
                pending = 0
            if raw.strip():
                yield number, raw
        bar.update(pending)


def parse_json_object(raw: bytes | str, file: str, line: int) -> dict:
    """One JSON-lines record; anything but a JSON object is a DataError at file:line."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg} at column {err.colno}", file, line) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text: {err.reason}", file, line) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file, line)
    return obj


@dataclass(frozen=True)
class TableFormat:
    """How one kind of source file is stored: Arrow schema (with an int64 `line` column) and key."""

    name: str
    schema: pa.Schema
    key: str | None = None
    unique_key: bool = True


RowProducer = Callable[[ErrorLog, dict], Iterator[dict]]
"""Yields parsed rows; reports bad rows to the ErrorLog; may put a `header` into the meta dict."""


class ArrowTable:
    """A memory-mapped table of parsed rows; `find(key)` gives the first row with that key."""

    def __init__(self, cache: Path, source: Path, fmt: TableFormat):
        self.cache, self.source, self.format = Path(cache), Path(source), fmt
        self.meta = json.loads((self.cache / "meta.json").read_text())
        self.table = pa.ipc.open_file(pa.memory_map(str(self.cache / "rows.arrow"))).read_all()
        if fmt.key:
            self._sorted_hashes = np.load(self.cache / "key_hashes.npy", mmap_mode="r")
            self._hash_rows = np.load(self.cache / "key_rows.npy", mmap_mode="r")

    def __reduce__(self):
        # Pickle (DataLoader workers, spawn) by location: the mapped pages are never copied.
        return (ArrowTable, (self.cache, self.source, self.format))

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def header(self) -> dict | None:
        return self.meta.get("header")

    @property
    def skipped(self) -> int:
        return self.meta["skipped"]

    @property
    def errors(self) -> list[DataError]:
        """The bad rows skipped while building (the first MAX_KEPT_ERRORS of them)."""
        return [_error_from_json(e) for e in self.meta["errors"]]

    def row(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {self.source} ({len(self)} rows)")
        return self.table.slice(index, 1).to_pylist()[0]

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Rows start..stop in order, converted one Arrow batch at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for batch in self.table.slice(start, max(stop - start, 0)).to_batches():
            yield from batch.to_pylist()

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)

    def find(self, key: str) -> int | None:
        if not self.format.key:
            raise TypeError(f"{self.format.name} tables have no key column")
        target = np.uint64(stable_hash64(key))
        keys = self.table.column(self.format.key)
        slot = int(np.searchsorted(self._sorted_hashes, target, side="left"))
        while slot < len(self._sorted_hashes) and self._sorted_hashes[slot] == target:
            index = int(self._hash_rows[slot])
            if keys[index].as_py() == key:
                return index
            slot += 1
        return None

    def __contains__(self, key: str) -> bool:
        return self.find(key) is not None

    def key_hashes(self) -> np.ndarray:
        """The 64-bit hashes of every row's key, sorted (a memory map)."""
        return self._sorted_hashes

    def has_keys(self, keys: list[str]) -> np.ndarray:
        """Membership of many keys at once, by hash alone: fast enough for millions of ids. A
        false 'present' needs a 64-bit hash collision, and `find` (which compares the strings)
        would still report that key missing."""
        if not self.format.key:
            raise TypeError(f"{self.format.name} tables have no key column")
        targets = np.fromiter((stable_hash64(key) for key in keys), dtype=np.uint64, count=len(keys))
        slots = np.searchsorted(self._sorted_hashes, targets)
        inside = slots < len(self._sorted_hashes)
        present = np.zeros(len(keys), dtype=bool)
        present[inside] = self._sorted_hashes[slots[inside]] == targets[inside]
        return present


def open_table(
    source: str | os.PathLike,
    fmt: TableFormat,
    produce: RowProducer,
    *,
    cache_dir: str | os.PathLike | None = None,
    on_error: OnError = "raise",
) -> ArrowTable:
    """The cached table of `source`, built by `produce` on first use.

    With on_error='raise' the first bad row raises its DataError (also when an earlier 'skip'
    build had skipped rows); with 'skip' bad rows are left out and listed in `table.errors`.
    """
    source = Path(source)
    if not source.is_file():
        raise DataError("file not found", str(source))
    log = ErrorLog(on_error)
    cache = _cache_path(source, fmt, Path(cache_dir) if cache_dir else default_cache_dir())
    if not (cache / "meta.json").is_file():
        _build(source, fmt, produce, cache, log)
    table = ArrowTable(cache, source, fmt)
    if on_error == "raise" and table.skipped:
        raise table.errors[0]
    return table


def require_rows(table: ArrowTable, what: str) -> ArrowTable:
    """`table`, unless it has no rows: then a DataError naming its file (a trainer or evaluator
    would otherwise fail later with num_samples=0 or an IndexError that names nothing)."""
    if len(table):
        return table
    skipped = f" ({table.skipped} bad rows were skipped)" if table.skipped else " (the file is empty)"
    raise DataError(f"no {what}{skipped}: the file needs at least one record; restore it or leave it out of the "
                    "config", str(table.source))


def _cache_path(source: Path, fmt: TableFormat, cache_dir: Path) -> Path:
    stat = source.stat()
    ident = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, fmt.name,
                        CACHE_VERSION])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir / f"{fmt.name}-{source.stem}-{digest}"


def _build(source: Path, fmt: TableFormat, produce: RowProducer, cache: Path, log: ErrorLog) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = temporary_dir(cache.parent, prefix=f".{cache.name}.")
    try:
        meta: dict = {}
        hashes = _write_rows(work / "rows.arrow", fmt, produce(log, meta))
        if fmt.key:
            order = np.argsort(hashes, kind="stable")
            duplicates = _duplicate_rows(work / "rows.arrow", fmt, hashes, order) if fmt.unique_key else []
            if duplicates:
                for err in _duplicate_errors(work / "rows.arrow", fmt, source, duplicates):
                    log.add(err)
                hashes = _drop_rows(work / "rows.arrow", fmt, hashes, [later for _, later in duplicates])
                order = np.argsort(hashes, kind="stable")
            np.save(work / "key_hashes.npy", hashes[order])
            np.save(work / "key_rows.npy", order.astype(np.int64))
        meta.update(
            source=str(source), format=fmt.name, version=CACHE_VERSION, skipped=log.count,
            errors=[_error_to_json(e) for e in log.kept],
        )
        (work / "meta.json").write_text(json.dumps(meta))
        if cache.exists() and not (cache / "meta.json").is_file():  # left by an interrupted older build
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(work, cache)
        except OSError:
            if not (cache / "meta.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_rows(path: Path, fmt: TableFormat, rows: Iterator[dict]) -> np.ndarray:
    hashes = array("Q")
    buffer: list[dict] = []
    written = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, fmt.schema) as writer:

        def flush() -> None:
            nonlocal written
            written += len(buffer)
            if fmt.key:
                hashes.extend(stable_hash64(row[fmt.key]) for row in buffer)
            writer.write_batch(pa.RecordBatch.from_pylist(buffer, schema=fmt.schema))
            buffer.clear()

        for row in rows:
            buffer.append(row)
            if len(buffer) >= BATCH_ROWS:
                flush()
        if buffer or not written:
            flush()
    return np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, np.uint64)


def _duplicate_rows(path: Path, fmt: TableFormat, hashes: np.ndarray, order: np.ndarray) -> list[tuple[int, int]]:
    """(first row, later row) pairs with equal keys, found among rows with equal hashes."""
    sorted_hashes = hashes[order]
    groups: dict[int, list[int]] = {}
    for slot in np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]):
        group = groups.setdefault(int(sorted_hashes[slot]), [int(order[slot])])
        group.append(int(order[slot + 1]))
    if not groups:
        return []
    keys = pa.ipc.open_file(pa.memory_map(str(path))).read_all().column(fmt.key)
    pairs = []
    for rows in groups.values():  # ascending row order: the argsort is stable
        first_row_of: dict[str, int] = {}
        for row in rows:
            key = keys[row].as_py()
            if key in first_row_of:
                pairs.append((first_row_of[key], row))
            else:
                first_row_of[key] = row
    return sorted(pairs, key=lambda pair: pair[1])


def _duplicate_errors(path: Path, fmt: TableFormat, source: Path, duplicates: list[tuple[int, int]]) -> list[DataError]:
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    keys, lines = table.column(fmt.key), table.column("line")
    return [
        DataError(
            f"duplicate {fmt.key} '{keys[later].as_py()}' (first on line {lines[first].as_py()})",
            str(source), lines[later].as_py(), fmt.key,
        )
        for first, later in duplicates
    ]


def _drop_rows(path: Path, fmt: TableFormat, hashes: np.ndarray, rows: list[int]) -> np.ndarray:
    """Rewrite the Arrow file without `rows`, batch by batch; return the remaining hashes."""
    keep = np.ones(len(hashes), dtype=bool)
    keep[rows] = False
    filtered = path.with_suffix(".filtered")
    with pa.memory_map(str(path)) as source_map, pa.OSFile(str(filtered), "wb") as sink:
        reader = pa.ipc.open_file(source_map)
        with pa.ipc.new_file(sink, fmt.schema) as writer:
            offset = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                writer.write_batch(batch.filter(pa.array(keep[offset:offset + batch.num_rows])))
                offset += batch.num_rows
    os.replace(filtered, path)
    return hashes[keep]


def _error_to_json(err: DataError) -> dict:
    return {"text": str(err), "file": err.file, "line": err.line, "field": err.field}


def _error_from_json(data: dict) -> DataError:
    err = DataError(data["text"])
    err.file, err.line, err.field = data["file"], data["line"], data["field"]
    return err
