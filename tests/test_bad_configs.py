"""Out-of-range config values and broken model directories end in one clear error naming the
config key (or the file) and what it accepts, before any work; never a traceback from deep
inside, an empty cache or a run of 0 steps.

OUT_OF_RANGE: 17 classes of bad value, each rejected when the config is built (from a file,
an override or a saved model's settings). 8 classes of broken model directory or device, each
rejected when the model loads: MODEL_DIRS (4), CUDA asked for on a machine without it, a
corrupt saved embedder_config.json, ADAPTERS (2: corrupt adapter_config.json, no adapter weights). Plus 2 handled correctly: `encode.use_gpu=yes|no`
(YAML booleans) and `train.warmup_ratio` passed to the scheduler as a ratio (1.0 = every update).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from umarvel.cli import main
from umarvel.config import ConfigError, load_config
from umarvel.errors import UmarvelError

ROOT = Path(__file__).resolve().parents[1]

# override -> what the error must say (the key, and the range or the rule)
OUT_OF_RANGE = {
    "train.per_device_batch_size=0": r"train\.per_device_batch_size: 0 is out of range; it must be >= 1",
    "train.per_device_batch_size=-2": r"train\.per_device_batch_size: -2 is out of range; it must be >= 1",
    "train.learning_rate=-1e-4": r"train\.learning_rate: -0\.0001 is out of range; it must be >= 0",
    "train.epochs=-1": r"train\.epochs: -1\.0 is out of range; it must be >= 0",
    "train.epochs=0": r"train\.epochs: 0 trains nothing: set epochs > 0, or max_steps > 0",
    "train.warmup_ratio=1.5": r"train\.warmup_ratio: 1\.5 is out of range; it must be >= 0 and <= 1",
    "train.gradient_accumulation_steps=0": r"train\.gradient_accumulation_steps: 0 is out of range",
    "model.lora.r=0": r"model\.lora\.r: 0 is out of range; it must be >= 1",
    "model.temperature.init=0.5": r"model\.temperature\.init: 0\.5 is outside \[min, max\] = \[0\.005, 0\.2\]",
    "model.temperature.min=0": r"model\.temperature\.min: 0\.0 is out of range; it must be > 0",
    "data.num_workers=-1": r"data\.num_workers: -1 is out of range; it must be >= 0",
    "encode.batch_size=-1": r"encode\.batch_size: -1 is out of range; it must be >= 1",
    "encode.batch_size=0": r"encode\.batch_size: 0 is out of range; it must be >= 1",
    "encode.shard_size=0": r"encode\.shard_size: 0 is out of range; it must be >= 1",
    "mine.depth=-5": r"mine\.depth: -5 is out of range; it must be >= 1",
    "distill.fraction=0": r"distill\.fraction: 0\.0 is out of range; it must be > 0 and <= 1",
    "model.prompt.max_pixels=100": r"model\.prompt\.max_pixels: 100 is below min_pixels 200",
}
NEEDS = {"model.prompt.max_pixels=100": ["model.prompt.min_pixels=200"]}


@pytest.mark.parametrize("override", OUT_OF_RANGE, ids=OUT_OF_RANGE.keys())
def test_an_out_of_range_value_names_its_key_and_range(tmp_path, override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=OUT_OF_RANGE[override]):
        load_config(None, [*NEEDS.get(override, []), override])
    section, *rest = key.split(".")
    nested = yaml.safe_load(value)
    for part in reversed(rest):
        nested = {part: nested}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({section: nested}))
    if override not in NEEDS:
        with pytest.raises(ConfigError, match=OUT_OF_RANGE[override]) as err:
            load_config(path)
        assert str(path) in str(err.value)


def test_the_cli_prints_the_range_error_as_one_line(tmp_path, capsys):
    config = str(ROOT / "configs" / "tiny" / "hardneg.yaml")
    assert main(["train", "--stage", "hardneg", "--config", config, "--set", "encode.batch_size=-1",
                 "--set", f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "encode.batch_size: -1 is out of range; it must be >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("word, value", [("yes", "yes"), ("no", "no"), ("true", "yes"), ("false", "no"),
                                         ("auto", "auto")])
def test_use_gpu_takes_yes_and_no_although_yaml_reads_them_as_booleans(word, value):
    assert load_config(None, [f"encode.use_gpu={word}"]).encode.use_gpu == value


@pytest.mark.parametrize("ratio, updates, warmup", [(0.0, 40, 0), (0.1, 40, 4), (0.5, 7, 4), (1.0, 40, 40),
                                                    (1.0, 3, 3)])
def test_warmup_ratio_is_a_fraction_of_the_updates(tmp_path, ratio, updates, warmup):
    from umarvel.training.stages import training_arguments

    config = load_config(None, [f"train.warmup_ratio={ratio}", "train.report_to=[]"])
    assert training_arguments(config, tmp_path).get_warmup_steps(updates) == warmup == math.ceil(ratio * updates)


def _broken_copy(tiny_model_dir, tmp_path, damage: str):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "corrupt config.json":
        (model / "config.json").write_text('{"model_type": "qwen2_vl", ')
    elif damage == "no weights":
        for weights in model.glob("*.safetensors"):
            weights.unlink()
    return model


# damage -> (model.device, what the error must name)
MODEL_DIRS = {
    "corrupt config.json": ("cpu", r"model/config\.json: not a readable model config"),
    "no weights": ("cpu", r"has no weights \(no \*\.safetensors file\)"),
    "a device torch does not know": ("gpu0", r"model\.device='gpu0' is not a device: use auto, cpu, cuda or cuda:N"),
    "a CUDA device this machine lacks": ("cuda:99", r"model\.device=cuda:99: this machine has"),
}


@pytest.mark.parametrize("damage", MODEL_DIRS, ids=MODEL_DIRS.keys())
def test_a_broken_model_directory_or_device_is_a_clear_error(tiny_model_dir, tmp_path, damage):
    from umarvel import Embedder

    device, message = MODEL_DIRS[damage]
    model = _broken_copy(tiny_model_dir, tmp_path, damage)
    with pytest.raises(UmarvelError, match=message):
        Embedder.from_pretrained(model, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_to_use_cpu(tiny_model_dir):
    from umarvel import Embedder

    with pytest.raises(UmarvelError, match=r"model\.device=cuda: this machine has no usable CUDA device.*"
                                           r"set model\.device=auto or cpu"):
        Embedder.from_pretrained(tiny_model_dir, device="cuda")


def test_a_corrupt_saved_embedder_config_names_the_file(tiny_model_dir, tmp_path):
    from umarvel import Embedder

    saved = Embedder.from_pretrained(tiny_model_dir).merge_and_save(tmp_path / "merged")
    (saved / "embedder_config.json").write_text(json.dumps({"format_version": 1})[:-3])
    with pytest.raises(UmarvelError, match=r"merged/embedder_config\.json: not valid JSON.*save or train it again"):
        Embedder.from_pretrained(saved)


# damage to a saved adapter -> what the error must say
ADAPTERS = {
    "corrupt adapter_config.json": r"adapter does not load .*save or train it again",
    "no adapter weights": r"adapter_model\.safetensors: missing; the saved model is damaged or incomplete",
}


@pytest.mark.parametrize("damage", ADAPTERS, ids=ADAPTERS.keys())
def test_a_damaged_saved_adapter_names_its_directory(tiny_model_dir, tmp_path, damage):
    from umarvel import Embedder

    saved = Embedder.from_pretrained(tiny_model_dir, trainable=True).save_pretrained(tmp_path / "adapter")
    if damage == "no adapter weights":
        (saved / "adapter_model.safetensors").unlink()
    else:
        (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(UmarvelError, match=ADAPTERS[damage]) as err:
        Embedder.from_pretrained(saved)
    assert str(saved) in str(err.value)
