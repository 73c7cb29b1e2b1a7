"""Use a trained embedder on your own corpus: build an index, search it (Retriever), serve it.

The names below load on first use: `umarvel.serving.limits` (read by the CLI's parser) must not
pull in torch and faiss.
"""
from __future__ import annotations

import importlib

_HOMES = {"Hit": "umarvel.serving.retriever", "Retriever": "umarvel.serving.retriever",
          "IndexManifest": "umarvel.serving.index_store"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'umarvel.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
