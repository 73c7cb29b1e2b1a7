"""Damaged weight files are one-line errors naming the file: a truncated adapter, temperature or
backbone, a shard the index names but the directory lacks, a run's model/ without its
temperature, a truncated checkpoint on resume. Never a safetensors header traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from umarvel import Embedder
from umarvel.errors import UmarvelError
from umarvel.weights import CHECKPOINT, MODEL_DIR, SAVED_MODEL


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A saved adapter of the tiny model."""
    out = tmp_path_factory.mktemp("saved") / "adapter"
    Embedder.from_pretrained(tiny_model_dir, trainable=True).save_pretrained(out)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "temperature.safetensors"])
def test_a_truncated_file_of_a_saved_embedder_is_named(saved, tmp_path, name):
    copy = _copy(saved, tmp_path / "adapter")
    _truncate(copy / name)
    with pytest.raises(UmarvelError) as err:
        Embedder.from_pretrained(copy)
    message = str(err.value)
    assert message.startswith(f"{copy / name}: not a whole safetensors file (") and message.endswith(SAVED_MODEL)
    assert "\n" not in message


def test_a_run_whose_model_lacks_its_temperature_is_named(saved, tmp_path):
    model = _copy(saved, tmp_path / "run" / "model")
    (model / "temperature.safetensors").unlink()
    with pytest.raises(UmarvelError) as err:
        Embedder.from_pretrained(tmp_path / "run")
    assert str(err.value) == f"{model / 'temperature.safetensors'}: missing; {SAVED_MODEL}"


def test_a_truncated_backbone_is_named(tiny_model_dir, tmp_path):
    backbone = _copy(Path(tiny_model_dir), tmp_path / "backbone")
    _truncate(backbone / "model.safetensors")
    with pytest.raises(UmarvelError) as err:
        Embedder.from_pretrained(backbone)
    assert str(err.value).startswith(f"{backbone / 'model.safetensors'}: not a whole safetensors file (")
    assert str(err.value).endswith(MODEL_DIR)


def test_a_shard_the_index_names_but_the_directory_lacks_is_named(tiny_model_dir, tmp_path):
    backbone = _copy(Path(tiny_model_dir), tmp_path / "sharded")
    weights = load_file(backbone / "model.safetensors")
    (backbone / "model.safetensors").unlink()
    keys = sorted(weights)
    shards = {key: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, key in enumerate(keys)}
    save_file({k: weights[k] for k in keys if shards[k].startswith("model-00001")},
              str(backbone / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    (backbone / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    with pytest.raises(UmarvelError) as err:
        Embedder.from_pretrained(backbone)
    assert str(err.value) == (f"{backbone / 'model.safetensors.index.json'} names the shard "
                              f"model-00002-of-00002.safetensors, which is missing from {backbone}; {MODEL_DIR}")


def test_a_truncated_checkpoint_on_resume_is_named(saved, tmp_path, tiny_model_dir):
    checkpoint = _copy(saved, tmp_path / "checkpoint-2")
    _truncate(checkpoint / "adapter_model.safetensors")
    embedder = Embedder.from_pretrained(tiny_model_dir, trainable=True)
    with pytest.raises(UmarvelError) as err:
        embedder.load_adapter_weights(checkpoint)
    assert str(err.value).startswith(f"{checkpoint / 'adapter_model.safetensors'}: not a whole safetensors file (")
    assert str(err.value).endswith(CHECKPOINT)
