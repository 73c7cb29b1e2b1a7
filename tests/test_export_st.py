"""`umarvel export --format sentence-transformers`: the exported directory loads in
sentence-transformers and embeds as umarvel does (bidirectional attention, the instruction masked
out of the pool, prompts as named prompts, unit vectors)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from conftest import draw_image
from umarvel import Embedder
from umarvel.errors import UmarvelError
from umarvel.export.to_sentence_transformers import export_sentence_transformers

INSTRUCTION = "Retrieve an image that matches the caption."
PARITY = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A saved adapter whose LoRA matrices are non-zero, as after training."""
    emb = Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"r": 4, "alpha": 8})
    generator = torch.Generator().manual_seed(0)
    for name, param in emb.backbone.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    return Embedder.from_pretrained(emb.save_pretrained(tmp_path_factory.mktemp("adapter") / "run"))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = export_sentence_transformers(trained, tmp_path_factory.mktemp("st") / "model",
                                       prompts={"caption": INSTRUCTION})
    return SentenceTransformer(str(out), trust_remote_code=True, device="cpu")


def test_text_image_and_pairs_embed_as_umarvel_does(trained, exported):
    inputs = ["two red circles", draw_image("red"), {"text": "same but blue", "image": draw_image("blue", "square")},
              "a much longer caption about a green square on the left of a small yellow star"]
    ours = trained.encode(inputs)
    theirs = exported.encode(inputs, batch_size=2)
    assert theirs.shape == ours.shape == (4, exported.get_embedding_dimension())
    assert np.abs(theirs - ours).max() <= PARITY
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)


def test_prompts_are_the_instruction_masked_out_of_the_pool(trained, exported):
    captions = ["two red circles", "a blue square"]
    ours = trained.encode(captions, prompt=INSTRUCTION)
    assert np.abs(exported.encode(captions, prompt_name="caption") - ours).max() <= PARITY
    assert np.abs(exported.encode(captions, prompt=INSTRUCTION) - ours).max() <= PARITY
    assert np.abs(exported.encode_query(captions) - trained.encode(captions)).max() <= PARITY
    assert exported.prompts == {"query": "", "document": "", "caption": INSTRUCTION}
    assert exported.similarity_fn_name == "cosine"


def test_the_export_is_self_contained_and_a_foreign_directory_is_kept(trained, tmp_path):
    out = export_sentence_transformers(trained, tmp_path / "model")
    modules = json.loads((out / "modules.json").read_text())
    assert modules[0]["type"] == "umarvel.export.st_module.UmarvelEmbedding" and modules[0]["path"] == ""
    assert json.loads((out / "embedder_config.json").read_text())["merged"] is True  # no path to the adapter's backbone
    assert export_sentence_transformers(trained, out) == out  # an export is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(UmarvelError, match="not replaced"):
        export_sentence_transformers(trained, tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_model_kwargs_apply_or_are_refused(trained, tmp_path):
    out = export_sentence_transformers(trained, tmp_path / "model")
    half = SentenceTransformer(str(out), trust_remote_code=True, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    assert half[0].embedder.backbone.dtype == torch.bfloat16
    with pytest.raises(UmarvelError, match="load_in_8bit"):
        SentenceTransformer(str(out), trust_remote_code=True, device="cpu", model_kwargs={"load_in_8bit": True})


def test_the_export_command_writes_what_the_api_does(trained, tmp_path, capsys):
    from umarvel.cli import main

    source = trained.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--format", "sentence-transformers", "--model", str(source), str(tmp_path / "st"),
                 "--prompt", f"caption={INSTRUCTION}", "--set", "model.dtype=bfloat16"]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    model = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    assert model.prompts["caption"] == INSTRUCTION
    assert model[0].embedder.backbone.dtype == torch.bfloat16  # --set model.* applies to what is exported
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--format", "sentence-transformers", "--model", str(source), str(tmp_path / "st2"),
              "--prompt", "no-equals"])
    assert exit_info.value.code == 2
    assert "expected NAME=TEXT" in capsys.readouterr().err
