"""`umarvel export --format sentence-transformers`: a directory `SentenceTransformer(OUT,
trust_remote_code=True)` loads and that embeds as umarvel does."""
from __future__ import annotations

from pathlib import Path

from umarvel.io import atomic_dir
from umarvel.modeling.embedder import NAMED_PROMPTS, Embedder

ST_RECORD = "modules.json"


def export_sentence_transformers(embedder: Embedder, out: str | Path, prompts: dict[str, str] | None = None) -> Path:
    """Write `embedder` (merged) as a sentence-transformers model into `out`, atomically.

    `prompts` become the model's named prompts (our instructions) beside the empty `query` and
    `document` ones; cosine is its similarity. The normalisation is inside our module (part of the
    model), so no Normalize module follows it. An existing `out` is replaced only when it is such
    an export.
    """
    from sentence_transformers import SentenceTransformer

    from umarvel.export.st_module import UmarvelEmbedding

    named = {**NAMED_PROMPTS, **embedder.prompts, **(prompts or {})}
    model = SentenceTransformer(modules=[UmarvelEmbedding(embedder)], prompts=named, similarity_fn_name="cosine",
                                device=str(embedder.device))
    with atomic_dir(out, record=ST_RECORD, kind="sentence-transformers export") as tmp:
        model.save(str(tmp), create_model_card=False)
    return Path(out)
