"""The sentence-transformers-style API of Embedder: every input kind means the item dict it
stands for, the output types and shapes, query instructions, and similarity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import draw_image
from umarvel import Embedder
from umarvel.errors import DataError

CAPTION = "a red circle on a white ground"
INSTRUCTION = "Retrieve an image that matches the caption."


@pytest.fixture(scope="module")
def embedder(tiny_model_dir) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "red.png"
    draw_image("red").save(path)
    return path


def test_each_input_kind_embeds_as_its_item_dict(embedder, picture):
    image = draw_image("red")
    kinds = embedder.encode([CAPTION, image, picture, {"text": CAPTION, "image": image}], convert_to_tensor=True)
    dicts = embedder.encode([{"text": CAPTION}, {"image": image}, {"image": str(picture)},
                             {"text": CAPTION, "image": image}], convert_to_tensor=True)
    assert kinds.shape == dicts.shape
    torch.testing.assert_close(kinds, dicts)
    assert not torch.allclose(kinds[0], kinds[1], atol=1e-3)  # text and image are different inputs


def test_a_str_is_text_even_when_it_names_an_existing_image(embedder, picture):
    as_str = embedder.encode(str(picture))
    np.testing.assert_array_equal(as_str, embedder.encode({"text": str(picture)}))
    assert not np.allclose(as_str, embedder.encode(picture), atol=1e-3)


def test_single_input_gives_a_vector_and_a_list_a_matrix(embedder):
    single, listed = embedder.encode(CAPTION), embedder.encode([CAPTION])
    assert single.ndim == 1 and listed.shape == (1, single.shape[0])
    np.testing.assert_array_equal(single, listed[0])


def test_output_types_follow_sentence_transformers(embedder):
    texts = [CAPTION, "a blue square"]
    default = embedder.encode(texts)
    tensor = embedder.encode(texts, convert_to_tensor=True)
    both = embedder.encode(texts, convert_to_numpy=True, convert_to_tensor=True)
    listed = embedder.encode(texts, convert_to_numpy=False)
    normalised = embedder.encode(texts, normalize_embeddings=True)
    assert isinstance(default, np.ndarray) and default.dtype == np.float32 and default.shape[0] == 2
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert isinstance(both, torch.Tensor)  # convert_to_tensor wins, as in sentence-transformers
    assert isinstance(listed, list) and [v.shape for v in listed] == [tensor[0].shape] * 2
    np.testing.assert_array_equal(default, tensor.numpy())
    torch.testing.assert_close(torch.stack(listed), tensor, rtol=0, atol=0)
    assert isinstance(embedder.encode(CAPTION, convert_to_numpy=False), torch.Tensor)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(default, axis=1), 1.0, atol=1e-5)  # unit norm is part of the model


def test_options_are_keyword_only(embedder):
    with pytest.raises(TypeError):
        embedder.encode([CAPTION], "query")  # once taken as the batch size
    with pytest.raises(TypeError):
        embedder.encode([CAPTION], 8)


def test_prompt_and_prompt_name_are_the_masked_instruction(embedder):
    expected = embedder.encode([{"text": CAPTION, "instruction": INSTRUCTION}])
    np.testing.assert_array_equal(embedder.encode([CAPTION], prompt=INSTRUCTION), expected)
    assert not np.allclose(expected, embedder.encode([CAPTION]), atol=1e-4)
    np.testing.assert_array_equal(embedder.encode([CAPTION], prompt_name="query"), embedder.encode([CAPTION]))
    embedder.prompts["query"] = INSTRUCTION
    try:
        np.testing.assert_array_equal(embedder.encode([CAPTION], prompt_name="query"), expected)
        np.testing.assert_array_equal(embedder.encode_query([CAPTION]), expected)
        np.testing.assert_array_equal(embedder.encode_document([CAPTION]), embedder.encode([CAPTION]))
    finally:
        embedder.prompts["query"] = ""
    with pytest.raises(ValueError, match="'passage' is not one of this embedder's prompts"):
        embedder.encode([CAPTION], prompt_name="passage")
    with pytest.raises(ValueError, match="not both"):
        embedder.encode([CAPTION], prompt_name="query", prompt=INSTRUCTION)
    with pytest.raises(ValueError, match="not several"):
        embedder.encode_query([CAPTION], instruction=INSTRUCTION, prompt="Find it.")


def test_batch_size_and_progress_bar_do_not_change_vectors(embedder, capsys, monkeypatch):
    from umarvel import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # the bar; off a terminal: tests/test_progress.py
    texts = [CAPTION, "a blue square", "two green triangles", "a yellow star"]
    one = embedder.encode(texts, batch_size=1, show_progress_bar=True)
    assert "encode" in capsys.readouterr().err
    np.testing.assert_allclose(one, embedder.encode(texts, batch_size=3), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(texts, batch_size=0)


def test_encode_query_adds_the_instruction_and_keeps_an_items_own(embedder):
    query = embedder.encode_query([CAPTION, {"text": CAPTION, "instruction": "Find a caption."}], instruction=INSTRUCTION)
    expected = embedder.encode([{"text": CAPTION, "instruction": INSTRUCTION},
                                {"text": CAPTION, "instruction": "Find a caption."}])
    np.testing.assert_array_equal(query, expected)
    assert not np.allclose(query[0], embedder.encode(CAPTION), atol=1e-4)
    np.testing.assert_array_equal(embedder.encode_document([CAPTION]), embedder.encode([{"text": CAPTION}]))


def test_similarity_is_the_cosine_matrix(embedder):
    queries = embedder.encode_query(["a red circle", "a blue square"], instruction=INSTRUCTION, convert_to_numpy=True)
    documents = embedder.encode_document([draw_image("red"), draw_image("blue", "square"), "a note"],
                                         convert_to_tensor=True)
    scores = embedder.similarity(queries, documents)
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores, torch.from_numpy(queries) @ documents.T, atol=1e-5, rtol=1e-5)
    assert embedder.similarity(queries[0], documents[0] * 3).shape == (1, 1)
    torch.testing.assert_close(embedder.similarity(queries[0], documents[0] * 3)[0, 0], scores[0, 0])


@pytest.mark.parametrize("bad, message", [(3, "input 1: cannot encode a int"),
                                          (Path("no/such.png"), "input 1: image file no/such.png not found"),
                                          ({"instruction": "x"}, "input 1: an item dict needs a text, an image or a video")])
def test_bad_inputs_name_their_position(embedder, bad, message):
    with pytest.raises(DataError, match=message):
        embedder.encode([CAPTION, bad])
