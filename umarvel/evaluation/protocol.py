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


@dataclass
class ItemSet:
    """Items to encode: `items(start, stop)` gives the item dicts (keys of `Embedder.encode`:
    text, image, instruction, ... and the id under `id_key`) in the order of `ids`; `sources`
    are the files they are read from, which the cache fingerprints."""

    name: str
    ids: list[str]
    items: Callable[[int, int], list[dict]]
    sources: list[Path]
    id_key: str = "id"

    def __len__(self) -> int:
        return len(self.ids)


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


@dataclass
class Ranking:
    """A search's result: per query id, candidate ids best first and their scores."""

    ids: dict[str, list[str]]
    scores: dict[str, list[float]]


class Benchmark(ABC):
    """A benchmark: its searches and its metrics over their rankings."""

    name: str

    @abstractmethod
    def retrievals(self) -> list[Retrieval]:
        """The searches to run (their item sets are encoded once even when shared)."""

    @abstractmethod
    def score(self, rankings: Mapping[str, Ranking]) -> dict[str, float]:
        """Metric name -> value in percent, from the rankings keyed by `Retrieval.name`."""
