"""Use a trained embedder on your own corpus: build an index, search it (Retriever), serve it."""
from umarvel.serving.index_store import IndexManifest
from umarvel.serving.retriever import Hit, Retriever

__all__ = ["Hit", "IndexManifest", "Retriever"]
