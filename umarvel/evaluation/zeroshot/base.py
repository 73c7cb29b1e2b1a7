"""What every zero-shot task shares: its place under the data root, its prompt choices, the
paper's numbers, and readers that name the bad file and record.

A task reads its files when constructed (so a bad layout fails before any encoding), then
declares its searches (`retrievals`) and scores the rankings the shared runner hands back.
"""
from __future__ import annotations

import json
from abc import abstractmethod
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from umarvel.data.prompts import ZEROSHOT, ZeroShotPrompt
from umarvel.errors import DataError
from umarvel.evaluation.protocol import Benchmark, ItemSet, Ranking


class Records:
    """A list of item dicts served by slices: the `items` of an ItemSet, picklable."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __call__(self, start: int, stop: int) -> list[dict]:
        return self.items[start:stop]


def item_set(name: str, items: list[dict], sources: list[Path]) -> ItemSet:
    """An ItemSet over `items` (each with a unique "id")."""
    ids = [item["id"] for item in items]
    twice = next((i for i, n in Counter(ids).items() if n > 1), None)
    if twice is not None:
        raise DataError(f"{name}: id {twice!r} occurs more than once", file=str(sources[0]) if sources else None)
    return ItemSet(name=name, ids=ids, items=Records(items), sources=sources)


class ZeroShotBenchmark(Benchmark):
    """A zero-shot set read from `data_root` in its public layout.

    `paper` holds the paper's numbers (Tables 8 and 9; metric name -> percent), shown beside
    ours only when `is_real_data` says the files look like the real release (its counts).
    `prompt_overrides` are PromptConfig fields to encode this task's items with (the
    compression suffix is a per-task choice of the official evaluation).
    `settings` is the task's protocol section; the zero-shot tasks have no options beyond the
    paper's protocol, so None (the defaults) is what they expect.
    """

    name: str
    paper: dict[str, float] = {}

    def __init__(self, data_root: Path, settings=None):
        self.root = Path(data_root)
        self.settings = settings
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
    """A JSON file, or an error naming the file and the line where it breaks."""
    if not path.is_file():
        raise DataError("file not found; see the task's layout in README (Zero-shot evaluation)", file=str(path))
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err.msg}", file=str(path), line=err.lineno) from None


def require_file(path: Path, what: str, where: Path, record=None) -> Path:
    """`path` if it exists; else an error naming the file that refers to it and the record."""
    if not path.is_file():
        at = f"record {record}: " if record is not None else ""
        raise DataError(f"{at}{what} {path} does not exist", file=str(where))
    return path


def field(record, key: str, types, where: Path, index):
    """`record[key]` of the expected type(s), or an error naming the file, the record (`index`;
    None for the file's top-level object) and the field."""
    at = f"record {index}: " if index is not None else ""
    if not isinstance(record, dict):
        raise DataError(f"{at}expected an object, got {type(record).__name__}", file=str(where))
    if key not in record:
        raise DataError(f"{at}missing", file=str(where), field=key)
    value = record[key]
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{at}expected {names}, got {type(value).__name__}", file=str(where), field=key)
    return value
