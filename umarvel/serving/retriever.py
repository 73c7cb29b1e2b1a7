"""Search a built index with the model that built it: the Python API under `umarvel search` (and the HTTP service).

    retriever = Retriever.load("indexes/my-corpus")
    hits = retriever.search("a red circle", k=5)            # one query: its hits
    batches = retriever.search(["a red circle", {"image": "q.png", "instruction": "Find the photo."}])
    hits[0].id, hits[0].score, hits[0].metadata

Queries take every form `Embedder.encode` takes. Scores are inner products of unit vectors
(cosine), best first; the index's own vectors are unit length in fp32 (see index_store).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from umarvel.errors import UmarvelError
from umarvel.retrieval.index import GPU_MAX_K, gpus_wanted, index_to_gpus, normalized_fp32
from umarvel.serving.index_store import IndexManifest, OpenIndex, open_index, set_search_params


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its cosine score, and its metadata (the corpus fields but the id)."""

    id: str
    score: float
    metadata: dict


class Retriever:
    """An embedder and the index built with it (same fingerprint), searched together."""

    def __init__(self, embedder, opened: OpenIndex, *, use_gpu: bool | str = "auto", search_params: str | None = None,
                 batch_size: int = 32):
        self.embedder, self.batch_size = embedder, batch_size
        self._opened = opened
        self.index = opened.index
        set_search_params(self.index, opened.manifest.search_params if search_params is None else search_params)
        self.on_gpu = gpus_wanted(use_gpu)
        if self.on_gpu:
            self.index = index_to_gpus(self.index)

    @classmethod
    def load(cls, index: str | os.PathLike, *, model=None, device: str | None = None, use_gpu: bool | str = "auto",
             search_params: str | None = None, batch_size: int = 32) -> "Retriever":
        """The index at `index` with its model: `model` is a path (default: the one the manifest
        names) or a loaded Embedder. A model whose fingerprint differs from the manifest's is an
        UmarvelError: its vectors would not be comparable with the index's. `device` places the
        model (default: the model settings'); `use_gpu` ("auto", True, False) puts a Flat or IVF
        index on every GPU faiss sees, in fp16 shards; `search_params` overrides the manifest's
        faiss parameters (e.g. "nprobe=32", "efSearch=128")."""
        from umarvel.modeling.embedder import Embedder, load_for_inference
        from umarvel.modeling.adapters import GivenSettings
        from umarvel.retrieval.encode import model_fingerprint

        opened = open_index(index)
        manifest = opened.manifest
        if isinstance(model, Embedder):
            embedder = model
        else:
            command = {"profile": manifest.profile, **({"device": device} if device else {})}
            path = model if model is not None else manifest.model
            if not os.path.exists(path):
                raise UmarvelError(f"{index}: the model it was built with, {path}, is not there; pass the model "
                                   "(--model PATH, or Retriever.load(..., model=PATH))")
            embedder = load_for_inference(path, GivenSettings(command=command))
        found = model_fingerprint(embedder)
        if found != manifest.fingerprint:
            raise UmarvelError(f"{index}: built with model fingerprint {manifest.fingerprint} ({manifest.model}, profile "
                               f"{manifest.profile}), the model given has {found}: its vectors are not comparable; "
                               "search with the model that built the index, or build it again")
        return cls(embedder, opened, use_gpu=use_gpu, search_params=search_params, batch_size=batch_size)

    @property
    def manifest(self) -> IndexManifest:
        """model, fingerprint, profile, dim, index_type, count (= size), corpus, search_params."""
        return self._opened.manifest

    def describe(self) -> dict:
        """What `GET /health` reports: the model, its fingerprint and profile, the index and its size."""
        manifest = self.manifest
        return {"model": manifest.model, "fingerprint": manifest.fingerprint, "profile": manifest.profile,
                "index_type": manifest.index_type, "index_size": manifest.count, "dimension": manifest.dim,
                "on_gpu": self.on_gpu}

    def __len__(self) -> int:
        return self.manifest.count

    def encode(self, items, *, instruction: str | None = None) -> np.ndarray:
        """float32 unit vectors of `items` (any form `Embedder.encode` takes; 1-D for one item);
        `instruction` leads every item without its own."""
        return self.embedder.encode(items, batch_size=self.batch_size, prompt=instruction, convert_to_numpy=True)

    def search(self, queries, k: int = 10, *, instruction: str | None = None) -> list[Hit] | list[list[Hit]]:
        """The k best items for each query, best first. One query (a str, dict, image or path) gives
        its list of hits; a list of queries gives one list per query. `instruction` leads every
        query without its own (as in `Embedder.encode_query`)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UmarvelError(f"k must be a positive integer, got {k!r}")
        if self.on_gpu and k >= GPU_MAX_K:
            raise UmarvelError(f"k={k} is too large for faiss on GPU (k < {GPU_MAX_K}); load with use_gpu=False")
        vectors = self.embedder.encode_query(queries, instruction=instruction, batch_size=self.batch_size,
                                             convert_to_numpy=True)
        single = vectors.ndim == 1
        scores, rows = self.index.search(normalized_fp32(np.atleast_2d(vectors)), min(int(k), len(self)))
        hits = [[self._hit(int(row), float(score)) for row, score in zip(ranked, scored) if row >= 0]
                for ranked, scored in zip(rows, scores)]
        return hits[0] if single else hits

    def _hit(self, row: int, score: float) -> Hit:
        return Hit(self._opened.ids[row], score, json.loads(self._opened.metadata[row]))
