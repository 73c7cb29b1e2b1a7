"""model_dir.describe: what a model directory is (backbone, adapter, run directory, merged
checkpoint, released layout; family and profile), the one rule for saved vs given settings,
and one-line errors for a directory it cannot read."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from umarvel.config import ConfigError
from umarvel.errors import UmarvelError
from umarvel.modeling.embedder import Embedder
from umarvel.modeling.model_dir import EMBEDDER, RERANKER, GivenSettings, describe, locate
from umarvel.modeling.reranker import Reranker
from umarvel.tiny import build_tiny_model


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One directory of each kind; the adapter's saved settings differ from the defaults (LoRA r
    4, no system turn, a learned temperature of 0.07)."""
    root = tmp_path_factory.mktemp("model_dir")
    embedder = Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"r": 4, "alpha": 8},
                                        prompt={"system_prompt": ""}, temperature={"init": 0.07})
    embedder.save_pretrained(root / "run" / "model")
    embedder.merge_and_save(root / "merged")
    Reranker.from_pretrained(tiny_model_dir, trainable=True).save_pretrained(root / "reranker" / "model")
    (root / "empty").mkdir()
    return {"backbone": Path(tiny_model_dir), "run": root / "run", "adapter": root / "run" / "model",
            "merged": root / "merged", "released": build_tiny_model(root / "released", seed=0, layout="umarvel-release"),
            "reranker": root / "reranker", "empty": root / "empty"}


# path given -> (kind, directory read, run directory, backbone, adapter), as keys of `dirs`
EXPECTED = {
    "backbone": ("backbone", "backbone", None, "backbone", None),
    "adapter": ("adapter", "adapter", None, "backbone", "adapter"),
    "run": ("adapter", "adapter", "run", "backbone", "adapter"),
    "merged": ("merged", "merged", None, "merged", None),
    "released": ("released", "released", None, "released", None),
}


@pytest.mark.parametrize("given", EXPECTED)
def test_each_kind_of_directory_is_recognised(dirs, given):
    kind, path, run_dir, backbone, adapter = EXPECTED[given]
    directory = describe(dirs[given])
    assert (directory.kind, directory.path, directory.run_dir) == (kind, dirs[path], run_dir and dirs[run_dir])
    assert directory.backbone_dir.resolve() == dirs[backbone].resolve()
    assert directory.adapter_dir == (adapter and dirs[adapter])
    assert directory.family.name == "qwen2-vl" and directory.model is EMBEDDER
    assert (directory.released_as and directory.released_as.name) == ("umarvel-release" if kind == "released" else None)
    assert (directory.saved is None) == (kind in ("backbone", "released"))


def test_the_saved_temperature_is_the_records_or_the_released_weight(dirs):
    assert describe(dirs["backbone"]).saved_temperature() is None
    for kind in ("adapter", "merged"):
        assert describe(dirs[kind]).saved_temperature()["tau"].item() == pytest.approx(0.07)
    released = describe(dirs["released"]).saved_temperature()["tau"]
    assert released.shape == (1,) and torch.isfinite(released).all()


def test_given_inference_settings_win_and_training_ones_stay_as_saved(dirs, tmp_path):
    """A config file's inference keys apply, `command` over `file`; its lora, temperature and
    backbone describe training and are left out; what nothing gives stays as saved."""
    given = GivenSettings(file={"backbone": str(tmp_path / "nowhere"), "lora": {"r": 16}, "pooling": "mean",
                                "temperature": {"init": 0.5}, "mask_instruction": False},
                          command={"pooling": "last", "prompt": {"max_text_tokens": 7}})
    config = describe(dirs["run"], given).config
    assert (config.pooling, config.mask_instruction, config.prompt.max_text_tokens) == ("last", False, 7)
    assert (config.lora.r, config.temperature.init, config.prompt.system_prompt) == (4, 0.07, "")
    assert describe(dirs["run"], given).backbone_dir.resolve() == dirs["backbone"].resolve()


def test_a_training_only_setting_given_now_is_an_error_for_a_trained_model_only(dirs):
    for kind in ("adapter", "merged", "released"):
        with pytest.raises(ConfigError, match=r"^model\.lora\.r: shapes training only, and .* is a"):
            describe(dirs[kind], GivenSettings(command={"lora": {"r": 2}}))
    assert describe(dirs["backbone"], GivenSettings(command={"lora": {"r": 2}})).config.lora.r == 2


def test_for_training_the_given_settings_configure_the_run_but_an_adapter_keeps_its_lora(dirs):
    assert describe(dirs["run"], trainable=True, overrides={"lora": {"r": 2}, "pooling": "last"}).config.lora.r == 4
    assert describe(dirs["run"], trainable=True, overrides={"pooling": "last"}).config.pooling == "last"
    assert describe(dirs["backbone"], trainable=True, overrides={"lora": {"r": 2}}).config.lora.r == 2


def test_a_backbone_given_now_is_where_an_adapters_backbone_is(dirs, tmp_path):
    moved = describe(dirs["run"], GivenSettings(command={"backbone": str(dirs["released"])}))
    assert moved.backbone_dir == dirs["released"] and moved.adapter_dir == dirs["adapter"]
    with pytest.raises(ConfigError, match=r"^model\.backbone: .*merged is a merged checkpoint, not an adapter"):
        describe(dirs["merged"], GivenSettings(command={"backbone": str(dirs["backbone"])}))


def test_the_reranker_reads_the_same_kinds_with_its_own_defaults(dirs):
    saved = describe(dirs["reranker"], model=RERANKER)
    assert (saved.kind, saved.path, saved.run_dir) == ("adapter", dirs["reranker"] / "model", dirs["reranker"])
    assert describe(dirs["backbone"], model=RERANKER).config.attention == "causal"
    assert describe(dirs["backbone"]).config.attention == "bidirectional"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_unrecognisable_directory_is_a_one_line_error_naming_it_and_what_was_expected(dirs):
    with pytest.raises(UmarvelError) as err:
        describe(dirs["empty"])
    assert _one_line(err) == (f"{dirs['empty']} is not a run directory, saved embedder or model directory: neither it "
                              f"nor {dirs['empty'] / 'model'} holds embedder_config.json or config.json")
    with pytest.raises(UmarvelError) as err:
        locate(dirs["empty"], RERANKER)
    assert "holds reranker_config.json or config.json" in _one_line(err)


def test_a_model_of_the_other_type_is_named_as_such(dirs):
    with pytest.raises(UmarvelError) as err:
        describe(dirs["reranker"])
    assert _one_line(err).startswith(f"{dirs['reranker']} is a reranker, not an embedder (train one with `umarvel train`")
    with pytest.raises(UmarvelError) as err:
        describe(dirs["run"], model=RERANKER)
    assert _one_line(err).startswith(f"{dirs['run']} is an embedder, not a reranker (train one with "
                                     "`umarvel train --stage reranker`")
