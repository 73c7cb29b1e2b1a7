"""The evaluator protocol: what a benchmark declares, so that encoding, caching, search, run
files and reports are written once for M-BEIR, the zero-shot sets and anything added later.

A benchmark lists its item sets and the searches between them (`Retrieval`); the shared
runner encodes each set once into the embedding cache, ranks every search's candidates per
query, and hands the rankings back to the benchmark's `score`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass
class ItemSet:
    """Items to encode: `items(start, stop)` gives the item dicts (keys of `Embedder.encode`:
    text, image, instruction, ... and the id under `id_key`) in the order of `ids`; `sources`
    are the files they are read from, which the cache fingerprints. `name` with the sources
    names the cache folder, so two sets built differently from the same files need two names.
    `images`, when given, returns a fingerprint of the image files the items name (computed when
    the set is encoded), so a changed image is encoded again."""

    name: str
    ids: list[str]
    items: Callable[[int, int], list[dict]]
    sources: list[Path]
    id_key: str = "id"
    parts: Sequence[ItemSet] = ()
    images: Callable[[], str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def union(cls, name: str, parts: Sequence[ItemSet]) -> ItemSet:
        """The concatenation of `parts` (M-BEIR's global pool): the runner encodes each part
        into the cache and searches their shards together, so nothing is encoded twice."""
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part))

        def items(start: int, stop: int) -> list[dict]:
            out = []
            for part, first in zip(parts, offsets):
                low, high = max(start - first, 0), min(stop - first, len(part))
                if low < high:
                    out.extend(part.items(low, high))
            return out

        return cls(name, [i for part in parts for i in part.ids], items,
                   [source for part in parts for source in part.sources], parts[0].id_key, tuple(parts))


@dataclass
class Retrieval:
    """One search: every query of `queries` ranks `candidates` and keeps its best `k`.
    `galleries` (query id -> candidate ids) restricts each query to its own candidates
    (GeneCIS's per-query galleries, a pairwise test's two captions); None = all candidates."""

    name: str
    queries: ItemSet
    candidates: ItemSet
    k: int
    galleries: Mapping[str, Sequence[str]] | None = None
    run_file: str = ""
    task_id: int | None = None

    @property
    def run_file_name(self) -> str:
        """`run_file`, or `<name>_run.txt`; `task_id` is the run file's last column when set."""
        return self.run_file or f"{self.name}_run.txt"


@dataclass
class Ranking:
    """A search's result: per query id, candidate ids best first and their scores."""

    ids: dict[str, list[str]]
    scores: dict[str, list[float]]


class Benchmark(ABC):
    """A benchmark: its searches and its metrics over their rankings.

    `paper` holds the paper's number per metric name; the report shows it beside ours only when
    `is_real_data` says the data is the published set (never on a fixture or a subset).
    `prompt_overrides` are PromptConfig fields the benchmark's items are encoded with (its own
    prompt choice, e.g. the "in one word" suffix); the runner applies them while it encodes.
    """

    name: str
    paper: Mapping[str, float] = MappingProxyType({})
    is_real_data: bool = False
    prompt_overrides: Mapping[str, object] = MappingProxyType({})

    @abstractmethod
    def retrievals(self) -> list[Retrieval]:
        """The searches to run (their item sets are encoded once even when shared)."""

    @abstractmethod
    def score(self, rankings: Mapping[str, Ranking]) -> dict[str, float]:
        """Metric name -> value in percent, from the rankings keyed by `Retrieval.name`."""

    def write_report(self, out_dir: Path, metrics: Mapping[str, float]) -> None:
        """results.json, results.md and results.png of the metrics (a benchmark with a report
        of its own, as M-BEIR's per-row tables, overrides this)."""
        from umarvel.evaluation.report import write_metrics_report

        write_metrics_report(out_dir, self, metrics)
