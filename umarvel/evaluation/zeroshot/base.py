"""What every zero-shot task shares: its place under the data root, its prompt choices, the
paper's numbers, and readers that name the bad file and record.

A task reads its files when constructed (so a bad layout fails before any encoding), then
declares its searches (`retrievals`) and scores the rankings the shared runner hands back.
The readers keep M-BEIR's rules (umarvel.data.files): every image and video path stays under
the data root, symlinks included unless data.allow_symlinks_outside_root; text is UTF-8; a
file with no records, a repeated id or a JSON value of the wrong type is an error naming the
file and the record or line, never a smaller or silently different test set. Every item set
fingerprints the image and video files its items name (by absolute path, size and mtime), so
an edited image, or a second copy of the data, is never served another file's vectors.
"""
from __future__ import annotations

import functools
import json
import os
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from umarvel.data.files import read_utf8, resolve_under
from umarvel.data.prompts import ZEROSHOT, ZeroShotPrompt
from umarvel.errors import DataError
from umarvel.evaluation.protocol import Benchmark, ItemSet, Ranking
from umarvel.retrieval.encode import images_fingerprint


class Records:
    """A list of item dicts served by slices: the `items` of an ItemSet, picklable."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __call__(self, start: int, stop: int) -> list[dict]:
        return self.items[start:stop]


def item_set(name: str, items: list[dict], sources: list[Path]) -> ItemSet:
    """An ItemSet over `items` (each with a unique "id"); its cache key covers the image and
    video files they name (`media_fingerprint`), not only the annotation files."""
    ids = [item["id"] for item in items]
    twice = next((i for i, n in Counter(ids).items() if n > 1), None)
    if twice is not None:
        raise DataError(f"{name}: id {twice!r} occurs more than once", file=str(sources[0]) if sources else None)
    return ItemSet(name=name, ids=ids, items=Records(items), sources=sources,
                   images=functools.partial(media_fingerprint, items))


def media_fingerprint(items: Iterable[dict]) -> str:
    """`images_fingerprint` of every image (one or a list) and video the items name. Their paths
    are absolute (ZeroShotBenchmark.media), so the data root is part of the fingerprint too."""
    paths: list[str] = []
    for item in items:
        image = item.get("image")
        paths.extend([image] if isinstance(image, str) else image or ())
        if item.get("video"):
            paths.append(item["video"]["path"])
    return images_fingerprint(os.sep, paths)


class ZeroShotBenchmark(Benchmark):
    """A zero-shot set read from `data_root` in its public layout.

    `paper` holds the paper's numbers (Tables 8 and 9; metric name -> percent), shown beside
    ours only when `is_real_data` says the files look like the real release (its counts).
    `prompt_overrides` are PromptConfig fields to encode this task's items with (the
    compression suffix is a per-task choice of the official evaluation).
    `settings` is the `eval.zeroshot` section (ZeroShotEvalConfig); None means its defaults, the
    paper's protocol (a task's one option, such as VisDial's caption, is read from it). `symlinks_outside_root` is
    data.allow_symlinks_outside_root: accept image and video symlinks leading out of the root.
    """

    name: str
    paper: dict[str, float] = {}

    def __init__(self, data_root: Path, settings=None, *, symlinks_outside_root: bool = False):
        self.root = Path(data_root)
        self.settings = settings
        self.symlinks_outside_root = symlinks_outside_root
        self.prompt: ZeroShotPrompt = ZEROSHOT[self.name]
        self.read()

    @abstractmethod
    def read(self) -> None:
        """Read and check the task's files."""

    @property
    @abstractmethod
    def is_real_data(self) -> bool:
        """Whether the files look like the real release (its counts), not a fixture or subset."""

    @property
    def prompt_overrides(self) -> dict[str, object]:
        return {"compression_prompt": self.prompt.compression}

    def instruction(self, search: str) -> str:
        return self.prompt.instructions[search]

    def media(self, *parts: str, where: Path, record=None, line: int | None = None, what: str = "image") -> Path:
        """The file at `parts` joined under the data root, kept there as M-BEIR's images are
        (umarvel.data.files.resolve_under: no absolute path, no `..` or symlink leaving the root),
        and existing; else an error naming `where` (the file that names it) and the record or
        line. A part taken from a data file that is absolute stays absolute, and is refused."""
        at = f"record {record}: " if record is not None else ""
        try:
            full = resolve_under(self.root, os.path.join(*parts), file=str(where), line=line, must_exist=False,
                                 symlinks_outside_root=self.symlinks_outside_root, what=what)
        except DataError as err:
            raise DataError(at + err.message, err.file, err.line, err.field) from None
        if not os.path.isfile(full):
            raise DataError(f"{at}{what} {full} does not exist", file=str(where), line=line)
        return Path(full)


def query_item(item_id: str, instruction: str, **content) -> dict:
    """A query item: its content and, when the task gives one, its instruction."""
    item = {"id": item_id, **{k: v for k, v in content.items() if v is not None}}
    if instruction:
        item["instruction"] = instruction
    return item


def ranked_ids(rankings: Mapping[str, Ranking], search: str, queries: ItemSet) -> dict[str, list[str]]:
    """The ranked candidate ids of every query of `search`; a query left out is an error."""
    if search not in rankings:
        raise DataError(f"no ranking for search {search!r} (got {sorted(rankings)})")
    ids = rankings[search].ids
    missing = [q for q in queries.ids if q not in ids]
    if missing:
        raise DataError(f"search {search!r}: {len(missing)} queries have no ranking (e.g. {missing[:3]})")
    return {q: list(ids[q]) for q in queries.ids}


def scores_by_candidate(ranking: Ranking) -> dict[str, dict[str, float]]:
    """query id -> candidate id -> score, from a ranking's parallel lists."""
    return {q: dict(zip(ids, ranking.scores[q])) for q, ids in ranking.ids.items()}


def read_json(path: Path):
    """A JSON file, or an error naming the file and the line where it breaks (a byte that is not
    UTF-8 included); a key given twice in one object is an error too (JSON keeps the last)."""
    if not path.is_file():
        raise DataError("file not found; see the task's layout in README (Zero-shot evaluation)", file=str(path))
    try:
        return json.loads(read_utf8(path), object_pairs_hook=functools.partial(_object, path))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg}", file=str(path), line=err.lineno) from None


def _object(path: Path, pairs: list[tuple[str, object]]) -> dict:
    twice = next((key for key, n in Counter(key for key, _ in pairs).items() if n > 1), None)
    if twice is not None:
        raise DataError(f"key {twice!r} appears twice in one JSON object (the later value would replace the earlier)",
                        file=str(path))
    return dict(pairs)


def json_records(path: Path, kind: type = list, what: str = "queries"):
    """The file's top-level JSON value, which must be a `kind` (list or dict) holding at least one
    record: an empty set is an error ("no queries"), not a score over nothing."""
    records = read_json(path)
    if not isinstance(records, kind):
        expected = "a JSON list" if kind is list else "a JSON object keyed by id"
        raise DataError(f"expected {expected} of records, got {type(records).__name__}", file=str(path))
    if not records:
        raise DataError(f"no {what}: the file holds an empty {type(records).__name__}", file=str(path))
    return records


class Ids:
    """Ids read from one file, each with the record that gave it. A dict keyed by id would keep a
    repeated id's later record and drop the earlier without a word: here a repeat is an error
    naming both records."""

    def __init__(self, what: str, where: Path):
        self.what, self.where, self.records = what, where, {}

    def add(self, key, record) -> None:
        if key in self.records:
            raise DataError(f"record {record}: {self.what} {key!r} repeats record {self.records[key]}",
                            file=str(self.where))
        self.records[key] = record


def field(record, key: str, types, where: Path, index):
    """`record[key]` of the expected type(s), or an error naming the file, the record (`index`;
    None for the file's top-level object) and the field."""
    at = f"record {index}: " if index is not None else ""
    if not isinstance(record, dict):
        raise DataError(f"{at}expected an object, got {type(record).__name__}", file=str(where))
    if key not in record:
        raise DataError(f"{at}missing", file=str(where), field=key)
    value = record[key]
    kinds = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(t.__name__ for t in kinds)
        raise DataError(f"{at}expected {names}, got {type(value).__name__}", file=str(where), field=key)
    return value
