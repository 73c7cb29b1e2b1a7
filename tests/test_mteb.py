"""The mteb adapter end to end: `mteb.evaluate` runs an image-text retrieval task built in memory
here (no hub download) on our embedder, and its numbers are the ones our own encode_query /
encode_document / similarity give; queries carry the task's instruction, candidates none."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import draw_image
from umarvel import Embedder

mteb = pytest.importorskip("mteb", reason="mteb is the optional extra umarvel[mteb] (in the dev extra)")

from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from umarvel.errors import UmarvelError  # noqa: E402
from umarvel.evaluation.mteb_adapter import MTEBEncoder, batch_items  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "circle", "square"]
PROMPT = "Find the picture the caption describes."
TASK = "UmarvelLocalT2I"


class LocalT2I(AbsTaskRetrieval):
    """Captions -> pictures of coloured shapes, four of each, one positive per caption."""

    metadata = TaskMetadata(
        name=TASK, description="Captions to pictures of coloured shapes, built in memory.", reference=None,
        dataset={"path": "local/umarvel-t2i", "revision": "0"}, type="Any2AnyRetrieval", category="t2i",
        modalities=["image", "text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="recall_at_1",
        date=("2026-01-01", "2026-01-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
        annotations_creators="derived", dialect=[], sample_creation="created", bibtex_citation="",
        prompt={"query": PROMPT},
    )

    def load_data(self, **kwargs) -> None:
        captions = [f"a {colour} {shape}" for colour, shape in zip(COLOURS, SHAPES)]
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_dict({"id": [f"q{i}" for i in range(4)], "text": captions}),
            corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(4)],
                                      "image": [draw_image(c, s) for c, s in zip(COLOURS, SHAPES)]}),
            relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(4)},
            top_ranked=None,
        )}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def embedder(tiny_model_dir) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir)


@pytest.fixture
def calls(embedder, monkeypatch) -> list[dict]:
    """Every Embedder.encode call the adapter makes: its instruction and inputs."""
    log: list[dict] = []
    original = Embedder.encode

    def recording(self, inputs, *args, **kwargs):
        log.append({"instruction": kwargs.get("prompt"), "items": list(inputs)})
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Embedder, "encode", recording)
    return log


def our_scores(embedder: Embedder, instruction: str) -> dict[str, float]:
    """recall@1 and MRR@10 of the task by our own API, as fractions."""
    captions = [f"a {colour} {shape}" for colour, shape in zip(COLOURS, SHAPES)]
    queries = embedder.encode_query(captions, instruction=instruction)
    documents = embedder.encode_document([draw_image(c, s) for c, s in zip(COLOURS, SHAPES)])
    scores = embedder.similarity(queries, documents).numpy()
    ranks = [1 + int(np.sum(row > row[i])) for i, row in enumerate(scores)]
    return {"recall_at_1": np.mean([r == 1 for r in ranks]), "mrr_at_10": np.mean([1 / r for r in ranks])}


def test_mteb_evaluate_runs_an_image_text_task_on_our_embedder(embedder, calls):
    result = mteb.evaluate(MTEBEncoder(embedder), LocalT2I(), cache=None, show_progress_bar=False)
    (task_result,) = result.task_results
    (scores,) = task_result.scores["test"]
    calls = list(calls)  # the adapter's calls, before our own below
    expected = our_scores(embedder, PROMPT)
    assert scores["recall_at_1"] == pytest.approx(expected["recall_at_1"], abs=1e-5)
    assert scores["mrr_at_10"] == pytest.approx(expected["mrr_at_10"], abs=1e-5)
    queries = [call for call in calls if call["items"][0]["text"]]
    documents = [call for call in calls if call["items"][0]["image"] is not None]
    assert queries and all(call["instruction"] == PROMPT for call in queries)
    assert documents and all(call["instruction"] is None and call["items"][0]["text"] is None for call in documents)
    assert sum(len(call["items"]) for call in calls) == 8


def test_an_instruction_given_for_the_task_wins_over_its_prompt(embedder, calls):
    mine = "Retrieve an image that matches the caption."
    mteb.evaluate(MTEBEncoder(embedder, instructions={TASK: mine}), LocalT2I(), cache=None, show_progress_bar=False)
    assert {call["instruction"] for call in calls if call["items"][0]["text"]} == {mine}


def test_batches_become_item_dicts():
    picture = draw_image("red")
    assert batch_items({"text": ["a", ""], "image": [picture, picture]}) == [
        {"text": "a", "image": picture}, {"text": None, "image": picture}]
    assert batch_items({"image": [picture]}) == [{"text": None, "image": picture}]
    with pytest.raises(UmarvelError, match="2 texts but 1 images"):
        batch_items({"text": ["a", "b"], "image": [picture]})
