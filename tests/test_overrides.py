"""Every model setting given for a command applies to whatever `--model` is (a backbone, an
adapter, a run directory, a merged checkpoint, a released layout): it changes the embedding cache
key and the vectors; a bad value, or a training-only setting for a trained model, is a one-line
error naming the key (issue #22 item 1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmeb_fixtures import write_mmeb

from umarvel.cli import _launched_embedder, _rerank_evaluator, build_parser, main
from umarvel.config import ConfigError, load_config
from umarvel.modeling.embedder import Embedder
from umarvel.modeling.reranker import Reranker
from umarvel.retrieval.encode import model_fingerprint
from umarvel.tiny import build_tiny_model

KINDS = ("backbone", "adapter", "run", "merged", "released")
TRAINED = KINDS[1:]
ITEMS = [{"text": "two red circles on the left", "instruction": "Find the image that matches the caption."},
         {"text": "a blue square"}]
RELEASE = ["--profile", "umarvel-release"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """The relative output paths of the commands land in the test's own directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One directory of each kind; the trained ones have a LoRA that is not the identity and a
    saved setting that differs from the default (no system turn)."""
    root = tmp_path_factory.mktemp("overrides")
    torch.manual_seed(0)  # LoRA A's initialisation: the same adapter whatever ran before
    embedder = Embedder.from_pretrained(tiny_model_dir, trainable=True, lora={"r": 4, "alpha": 8},
                                        prompt={"system_prompt": ""})
    generator = torch.Generator().manual_seed(0)
    for name, param in embedder.backbone.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    embedder.save_pretrained(root / "run" / "model")
    embedder.merge_and_save(root / "merged")
    released = build_tiny_model(root / "released", seed=0, layout="umarvel-release")
    return {"backbone": Path(tiny_model_dir), "adapter": root / "run" / "model", "run": root / "run",
            "merged": root / "merged", "released": released}


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory, tiny_model_dir) -> Path:
    """Rows for <instruction_start>, <instruction_end> (and <emb> where the vocabulary grows)."""
    hidden = json.loads((Path(tiny_model_dir) / "config.json").read_text())["text_config"]["hidden_size"]
    path = tmp_path_factory.mktemp("markers") / "rows.npy"
    np.save(path, np.full((3, hidden), 0.5, dtype=np.float32))
    return path


def _argv(model: Path, *extra: str, verb: tuple[str, ...] = ("eval", "mbeir"), data: str = "missing-data") -> list[str]:
    tail = ["--out", "negatives.jsonl"] if verb == ("mine-negatives",) else ["--output-dir", "out"]
    return [*verb, "--model", str(model), "--data", data, *tail, *extra]


def _load(model: Path, *extra: str) -> Embedder:
    """The embedder `umarvel eval mbeir` loads for these arguments (the CLI's own path)."""
    args = build_parser().parse_args(_argv(model, *extra))
    with _launched_embedder(args) as (_, embedder):
        return embedder


_BASELINES: dict = {}


def _embedded(model: Path, *extra: str) -> tuple[str, torch.Tensor]:
    """(cache fingerprint, vectors of ITEMS one per call, so no batch is padded whatever the
    profile's batching rule)."""
    key = (model, extra)
    if key not in _BASELINES:
        embedder = _load(model, *extra)
        vectors = torch.cat([embedder.encode([item], convert_to_tensor=True).float() for item in ITEMS])
        _BASELINES[key] = model_fingerprint(embedder), vectors
    return _BASELINES[key]


OVERRIDES = {  # name: (arguments of the baseline, arguments added)
    "mask_instruction": ((), ("--set", "model.mask_instruction=false")),
    "dtype": ((), ("--set", "model.dtype=float16")),
    "unpadded_causal": (tuple(RELEASE), ("--set", "model.rules.unpadded_causal=false")),
    "marker_rows": (tuple(RELEASE), ("--set", "model.rules.marker_rows={markers}")),
    "profile": ((), ("--set", "model.profile=umarvel-release")),
    "--profile": ((), tuple(RELEASE)),
}


@pytest.mark.parametrize("override", list(OVERRIDES))
@pytest.mark.parametrize("kind", KINDS)
def test_a_given_model_setting_changes_the_cache_key_and_the_vectors(models, marker_file, kind, override):
    base, added = OVERRIDES[override]
    added = tuple(arg.format(markers=marker_file) for arg in added)
    fingerprint, vectors = _embedded(models[kind], *base)
    changed_fingerprint, changed = _embedded(models[kind], *base, *added)
    assert changed_fingerprint != fingerprint
    assert (changed - vectors).abs().max() > 1e-6  # fp16 moves unit vectors by 1e-5..1e-3; a dropped setting by 0


def test_a_marker_rows_file_is_keyed_by_its_content(models, marker_file, tmp_path):
    rows = tmp_path / "rows.npy"
    np.save(rows, np.load(marker_file))
    given = (*RELEASE, "--set", f"model.rules.marker_rows={rows}")
    before = model_fingerprint(_load(models["released"], *given))
    np.save(rows, np.load(marker_file) * 2)
    assert model_fingerprint(_load(models["released"], *given)) != before


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("umarvel: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("verb", [("eval", "mbeir"), ("eval", "zeroshot"), ("eval", "mmeb"), ("mine-negatives",)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_profile_or_marker_file_is_an_error_naming_the_key(models, kind, verb, capsys, tmp_path):
    model = models[kind]
    data = str(write_mmeb(tmp_path / "mmeb")) if verb == ("eval", "mmeb") else "missing-data"  # read before the model
    err = _one_line_error(capsys, _argv(model, "--set", "model.profile=bogus", verb=verb, data=data))
    assert "model.profile: unknown embedding profile 'bogus'" in err
    missing = tmp_path / "nonexistent.npy"
    err = _one_line_error(capsys, _argv(model, "--set", f"model.rules.marker_rows={missing}", verb=verb, data=data))
    assert f"model.rules.marker_rows: {missing} is neither 'seed:N' nor an existing file" in err


@pytest.mark.parametrize("setting", ["model.lora.r=2", "model.temperature.init=0.1", "model.gradient_checkpointing=true"])
@pytest.mark.parametrize("kind", TRAINED)
def test_a_training_only_setting_for_a_trained_model_is_an_error_naming_it(models, kind, setting, capsys):
    err = _one_line_error(capsys, _argv(models[kind], "--set", setting))
    key = setting.split("=")[0]
    assert f"{key}: shapes training only" in err and "fixed by its training" in err


def test_a_backbone_takes_training_settings_as_before(models, capsys):
    """An untrained backbone takes a config's whole model section: the model loads, then the
    missing data is what stops the command."""
    err = _one_line_error(capsys, _argv(models["backbone"], "--set", "model.lora.r=2"))
    assert "M-BEIR directory not found" in err


@pytest.mark.parametrize("kind", ["backbone", "merged", "released"])
def test_a_backbone_given_for_a_model_that_holds_its_weights_is_an_error(models, kind, capsys):
    err = _one_line_error(capsys, _argv(models[kind], "--set", f"model.backbone={models['backbone']}"))
    assert "model.backbone: " in err and "not an adapter" in err


def test_a_config_file_applies_to_a_saved_adapter_but_for_its_training_keys(models, tmp_path):
    """The file's inference settings apply; its lora, temperature and backbone describe training
    (left out); what neither the file nor --set gives stays as saved."""
    config = tmp_path / "eval.yaml"
    config.write_text("model:\n  backbone: /nowhere\n  lora: {r: 16}\n  temperature: {learnable: true, init: 0.1}\n"
                      "  mask_instruction: false\n  prompt: {max_text_tokens: 7}\n")
    embedder = _load(models["run"], "--config", str(config), "--set", "model.pooling=last")
    settings = embedder.settings
    assert (settings.mask_instruction, settings.prompt.max_text_tokens, settings.pooling) == (False, 7, "last")
    assert settings.lora.r == 4 and settings.temperature.init == 0.05 and settings.prompt.system_prompt == ""
    assert settings.backbone == str(models["backbone"].resolve())
    plain = _load(models["run"])
    assert (plain.settings.mask_instruction, plain.settings.prompt.max_text_tokens) == (True, 480)


def test_the_python_api_follows_the_same_rule(models, tmp_path):
    """from_pretrained's keyword settings are given now, like --set; training keeps its own rule
    (a saved adapter continues with its LoRA shape)."""
    with pytest.raises(ConfigError, match=r"^model\.lora\.r: shapes training only"):
        Embedder.from_pretrained(models["run"], lora={"r": 2})
    with pytest.raises(ConfigError, match=r"^model\.rules\.marker_rows: .*nonexistent.npy is neither"):
        Embedder.from_pretrained(models["backbone"], rules={"marker_rows": str(tmp_path / "nonexistent.npy")})
    assert Embedder.from_pretrained(models["run"], trainable=True, lora={"r": 2}).settings.lora.r == 4


def test_eval_mbeir_keys_each_given_setting_to_its_own_cache(models, synthetic_dir, tmp_path):
    cache = tmp_path / "cache"
    common = ["--data", str(synthetic_dir), "--set", "eval.mbeir.rows=[mscoco_task0]", "--cache-dir", str(cache)]
    for extra in ([], ["--set", "model.mask_instruction=false"]):
        argv = ["eval", "mbeir", "--model", str(models["run"]), "--output-dir", str(tmp_path / "out"), *common, *extra]
        assert main(argv) == 0
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


@pytest.fixture(scope="module")
def saved_reranker(tiny_model_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("reranker") / "reranker"
    Reranker.from_pretrained(tiny_model_dir, trainable=True, prompt={"max_text_tokens": 40}).save_pretrained(
        directory / "model")
    return directory


def _reranker(saved_reranker: Path, monkeypatch, *extra: str) -> Reranker:
    """The reranker `eval mbeir --rerank` loads for these arguments."""
    import umarvel.evaluation.rerank as rerank_module

    monkeypatch.setattr(rerank_module, "RerankingEvaluator", lambda embedder, reranker, *_, **__: reranker)
    args = build_parser().parse_args(_argv(Path("unused"), "--rerank", str(saved_reranker), *extra))
    return _rerank_evaluator(args, None, load_config(args.config, args.overrides))


def test_the_reranker_honours_given_settings_without_a_config(saved_reranker, monkeypatch, tmp_path):
    """dtype and kernel apply; the saved prompt stays; --set model.backbone is the embedder's
    (the reranker finds its own); a training-only setting is refused as for the embedder."""
    kept = _reranker(saved_reranker, monkeypatch)
    assert kept.dtype == torch.float32 and kept.settings.attn_implementation == "sdpa"
    given = _reranker(saved_reranker, monkeypatch, "--set", "model.dtype=float16", "--set",
                      "model.attn_implementation=eager", "--set", f"model.backbone={tmp_path / 'nowhere'}")
    assert given.dtype == torch.float16 and given.settings.attn_implementation == "eager"
    assert given.settings.prompt.max_text_tokens == 40
    with pytest.raises(ConfigError, match=r"model\.lora\.r: shapes training only"):
        _reranker(saved_reranker, monkeypatch, "--set", "model.lora.r=2")


@pytest.mark.parametrize(("key", "value"), [("batching", "length"), ("batching", "file:4"), ("text_format", "umarvel")])
def test_release_batching_and_text_rules_reach_the_embedder_from_the_command_line(models, key, value):
    """`--set model.rules.batching / text_format` without --config: the loaded embedder follows
    them and the cache key changes with them."""
    released = _load(models["released"], *RELEASE)
    changed = _load(models["released"], *RELEASE, "--set", f"model.rules.{key}={value}")
    assert getattr(changed.rules, key) == value != getattr(released.rules, key)
    assert model_fingerprint(changed) != model_fingerprint(released)
