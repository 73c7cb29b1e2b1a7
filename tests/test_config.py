"""Config files, inheritance and overrides; every error names the offending key."""
from __future__ import annotations

import pytest
import yaml

from umarvel.config import Config, ConfigError, describe, load_config, save_config, to_dict


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_every_field_documented():
    config = load_config()
    assert config.model.attention == "bidirectional" and config.model.pooling == "mean"
    assert all(text for _, _, text in describe())


def test_inherit_and_override(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"lora": {"r": 64, "alpha": 128}, "pooling": "last"}})
    child = write(tmp_path / "child.yaml", {"inherit": "base.yaml", "model": {"lora": {"r": 128}}})
    config = load_config(child, ["model.lora.alpha=256", "model.temperature.init=5e-2", "run.seed=7"])
    assert (config.model.lora.r, config.model.lora.alpha, config.model.pooling) == (128, 256, "last")
    assert config.model.temperature.init == 0.05 and config.run.seed == 7


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"lora": {"rank": 4}}}, r"model\.lora\.rank: unknown key"),
        ({"modle": {}}, r"modle: unknown key"),
        ({"model": {"lora": {"r": "big"}}}, r"model\.lora\.r: expected an integer"),
        ({"model": {"attention": "sideways"}}, r"model\.attention: 'sideways' is not one of"),
        ({"model": {"mask_instruction": "yes"}}, r"model\.mask_instruction: expected true/false"),
        ({"model": {"lora": {"target_modules": "q_proj"}}}, r"model\.lora\.target_modules: expected a list"),
        ({"model": 3}, r"model: expected a mapping"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path, data, message):
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_override_and_cycles(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.lora\.rr: unknown key"):
        load_config(None, ["model.lora.rr=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["model.lora.r"])
    write(tmp_path / "a.yaml", {"inherit": "b.yaml"})
    write(tmp_path / "b.yaml", {"inherit": "a.yaml"})
    with pytest.raises(ConfigError, match="inherit cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["model.lora.r=16"])
    path = save_config(config, tmp_path / "run")
    assert load_config(path) == config
    assert isinstance(config, Config) and to_dict(config)["model"]["lora"]["r"] == 16


def test_the_flat_eval_keys_still_load_under_their_new_sections(tmp_path):
    """Encoding settings moved to `encode:`, M-BEIR's to `eval.mbeir:` (MOVED_KEYS); files,
    --set overrides, sub-stages and a run's recorded config.yaml written before still load."""
    base = write(tmp_path / "old.yaml", {
        "eval": {"batch_size": 8, "shard_size": 100, "split": "val", "rows": ["mscoco_task0"], "top_k": 20},
        "stages": {"nli": {"eval": {"cache_dir": "/tmp/vectors"}}},
    })
    config = load_config(base, ["eval.use_gpu='no'", "stages.cc3m.eval.top_k=30"])
    assert (config.encode.batch_size, config.encode.shard_size, config.encode.use_gpu) == (8, 100, "no")
    assert (config.eval.mbeir.split, config.eval.mbeir.rows, config.eval.mbeir.top_k) == ("val", ["mscoco_task0"], 20)
    assert config.stages["nli"] == {"encode": {"cache_dir": "/tmp/vectors"}}
    assert config.stages["cc3m"] == {"eval": {"mbeir": {"top_k": 30}}}
    assert to_dict(config)["eval"] == {"mbeir": {"split": "val", "rows": ["mscoco_task0"], "top_k": 20, "pools": ["local"]},
                                       "zeroshot": {"tasks": [], "data": "", "visdial_caption": False}}


def test_a_key_given_under_both_names_is_an_error(tmp_path):
    path = write(tmp_path / "both.yaml", {"eval": {"batch_size": 8}, "encode": {"batch_size": 16}})
    with pytest.raises(ConfigError, match=r"eval\.batch_size is the old name of encode\.batch_size"):
        load_config(path)
    assert load_config(write(tmp_path / "same.yaml", {"eval": {"top_k": 9}, "encode": {}})).eval.mbeir.top_k == 9


def test_umarvel_config_lists_the_moved_keys(capsys):
    from umarvel.cli import main

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "[moved keys]" in out and "eval.batch_size" in out and "-> encode.batch_size" in out
    assert "eval.mbeir.pools" in out and "eval.zeroshot.data" in out


def test_gradcache_chunk_tokens_is_off_by_default_and_a_positive_integer():
    assert load_config().train.loss.gradcache_chunk_tokens is None
    assert load_config(None, ["train.loss.gradcache_chunk_tokens=4096"]).train.loss.gradcache_chunk_tokens == 4096
    assert load_config(None, ["train.loss.gradcache_chunk_tokens=null"]).train.loss.gradcache_chunk_tokens is None
    with pytest.raises(ConfigError, match=r"train\.loss\.gradcache_chunk_tokens: 0 is out of range; it must be >= 1"):
        load_config(None, ["train.loss.gradcache_chunk_tokens=0"])
    with pytest.raises(ConfigError, match=r"train\.loss\.gradcache_chunk_tokens: 'many' does not match"):
        load_config(None, ["train.loss.gradcache_chunk_tokens=many"])
